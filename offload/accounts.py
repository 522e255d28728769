"""When a user's session ends, so do their live connections, on every worker.

A websocket or event stream authenticates once, at the handshake; from then
on nothing asks the session again. Without this module a socket opened before
a logout kept receiving ``user:<id>`` messages and could still subscribe to
``room:*`` (found by the security review, issue 10).

Three events end a user's connections: a logout (``user_logged_out``), a
password change and a deactivation (``is_active`` set to False), both seen
when the user row is saved. Any process may see them (a view, the admin, a
management command, a spooler task), while the sockets live in the workers
of every instance, so the request travels on the hubs' control channel
(:func:`offload.backend.hub.send_control`) and each hub closes its own connections of
that user: websockets with close code ``4001`` (``CloseCode.SESSION_ENDED``),
event streams by ending them. The browser reconnects with its new session,
if any, and gets only what that session may see.
"""

from __future__ import annotations

import logging
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_init, post_save

from .backend.hub import on_control, send_control
from .core.closes import Disconnect
from .exceptions import BackendUnavailable
from .transports.connection import close_user
from .transports.sse import close_user_streams

__all__ = ["disconnect_user", "install"]

log = logging.getLogger("offload.accounts")

_COMMAND = "disconnect_user"
_SEEN = "_offload_credentials"  # what a loaded user row held: (password hash, is_active)


def disconnect_user(user_id: int, why: Disconnect = Disconnect.LOGGED_OUT) -> None:
    """Close every websocket and event stream of ``user_id`` on every worker and instance.

    Raises:
        BackendUnavailable: Redis is down; no connection was closed.
    """
    send_control({"op": _COMMAND, "user": int(user_id), "why": why.name})


def _on_control(command: dict) -> None:
    if command.get("op") != _COMMAND or not isinstance(command.get("user"), int):
        return
    why = Disconnect.__members__.get(command.get("why"), Disconnect.LOGGED_OUT)
    user_id = command["user"]
    sockets = close_user(user_id, why)
    streams = close_user_streams(user_id, why)
    if sockets or streams:
        log.info("closed %d websocket(s) and %d event stream(s) of user %s: %s", sockets, streams, user_id, why.reason)


def _logged_out(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    if user is not None and user.pk is not None:
        _disconnect_quietly(user.pk, Disconnect.LOGGED_OUT)


def _remember(sender: Any, instance: Any, **kwargs: Any) -> None:
    instance.__dict__[_SEEN] = (instance.__dict__.get("password"), instance.__dict__.get("is_active"))


def _saved(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    if created:
        return
    before = instance.__dict__.get(_SEEN)
    password, active = instance.__dict__.get("password"), instance.__dict__.get("is_active")
    instance.__dict__[_SEEN] = (password, active)
    if before is None:
        return
    if before[0] is not None and password != before[0]:
        _disconnect_quietly(instance.pk, Disconnect.PASSWORD_CHANGED)
    elif before[1] and active is False:
        _disconnect_quietly(instance.pk, Disconnect.DEACTIVATED)


def _disconnect_quietly(user_id: int, why: Disconnect) -> None:
    """A logout must succeed even when Redis is down: log what could not be done."""
    try:
        disconnect_user(user_id, why)
    except BackendUnavailable as exc:
        log.warning("could not close the connections of user %s (%s): %s", user_id, why.reason, exc)


def install() -> None:
    """Connect the signals and the hubs' control handler (``offload.apps`` calls it once)."""
    user_model = get_user_model()
    user_logged_out.connect(_logged_out, dispatch_uid="offload.accounts.logged_out")
    post_init.connect(_remember, sender=user_model, dispatch_uid="offload.accounts.remember")
    post_save.connect(_saved, sender=user_model, dispatch_uid="offload.accounts.saved")
    on_control(_on_control)
