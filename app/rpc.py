"""The demo's RPC methods (offload imports every installed app's ``rpc`` module at start-up).

"typing…" is an RPC rather than a client publish: the ``typing`` namespace
stays server-only, so nobody can post a notice in someone else's name or flood
it past the RPC limits; the call checks the room and stamps the username, and
the notice is a one-message history that expires within seconds.
"""

from __future__ import annotations

from typing import Any

import offload
from offload.policies import Identity

from .chat import checked_room

__all__ = ["typing"]


@offload.rpc("typing")
def typing(identity: Identity, data: Any) -> None:
    """``rpc typing {"room": R}``: tell the room's other pages that this user is typing.

    Raises:
        offload.Rejected: ``forbidden`` (not logged in), ``unknown_room``.
    """
    if not identity.is_authenticated:
        raise offload.Rejected("log in to chat", code="forbidden")
    room = checked_room(data.get("room") if isinstance(data, dict) else None)
    offload.publish(f"typing:{room}", {"user": identity.username})
