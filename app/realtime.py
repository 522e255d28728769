"""The chat's publish hook: messages sent over the websocket are checked and saved here.

offload runs it in its thread pool (the ORM blocks), never on the event loop,
and sends a :class:`offload.Rejected` to the client as an ``error`` with its
code; any other exception is an ``internal_error`` (logged).

A page sends ``{"type": "publish", "channel": "room:<room>", "data": {"text":
...}}``. :func:`save_chat_message` (the ``room`` namespace's ``publish_hook``)
checks the text with the same form as the HTTP view, saves a
:class:`~app.models.ChatMessage` and returns what is published: the author is
the connection's user, whatever the client sent. The "typing…" notices are an
RPC (app/rpc.py).
"""

from __future__ import annotations

from typing import Any

import offload
from offload.policies import Identity

from .chat import checked_room, save_message
from .forms import MessageForm

__all__ = ["save_chat_message"]


def save_chat_message(identity: Identity, channel: str, data: Any) -> dict[str, Any]:
    """The ``room`` namespace's publish hook: check, save, and say what to publish.

    Raises:
        offload.Rejected: ``unknown_room``; ``bad_message`` (not ``{"text": "..."}``);
            ``empty``, ``too_long``, ``invalid_text`` (from :class:`~app.forms.MessageForm`).
    """
    room = checked_room(channel.partition(":")[2])
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str):
        raise offload.Rejected('a chat message is {"text": "..."}', code="bad_message")
    form = MessageForm({"text": text})
    if not form.is_valid():
        code, reason = form.first_error()
        raise offload.Rejected(reason, code=code)
    return save_message(room, identity.user_id, identity.username, form.cleaned_data["text"])
