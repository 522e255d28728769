"""The two websocket endpoints: channels (``/ws/``) and echo (``/ws/echo``).

:class:`ChannelsEndpoint` speaks the JSON protocol of ``docs/protocol.md``:
it parses client commands and checks namespace policies; its
:class:`~offload.core.session.ChannelSession` (the same one event streams use)
does the subscriptions, history and live delivery. The endpoint is the
session's websocket transport.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from .. import conf
from ..backend.presence_store import presence
from ..backend.publishing import publish_json
from ..blocking import run_blocking
from ..core.closes import Disconnect
from ..core.cursor import Entry
from ..core.protocol import (
    Members,
    Ping,
    Publish,
    Refresh,
    Rpc,
    StreamId,
    Subscribe,
    Unsubscribe,
    command_from_object,
    error_text,
    parse_command,
    reply,
)
from ..core.session import HubLink
from ..exceptions import BackendUnavailable, PermissionDenied, RefusedError
from ..logs import connection_fields
from ..policies import check_publish, check_subscribe, token_identity
from ..tokens import expiry_deadline, query_subscriptions, verify_connection_token
from .calls import Calls
from .connection import Endpoint, WebSocket
from .sessions import channel_session

__all__ = ["ChannelsEndpoint", "EchoEndpoint"]

log = logging.getLogger("offload.transports.endpoints")


class EchoEndpoint(Endpoint):
    """Echo every message back with its type (text as text, binary as binary)."""

    def on_text(self, text: str) -> None:
        self.ws.send_text(text)

    def on_binary(self, data: bytes) -> None:
        self.ws.send_binary(data)


class ChannelsEndpoint(Endpoint):
    """Subscribe/unsubscribe/publish/ping over JSON text messages; a session's websocket transport."""

    def __init__(self, ws: WebSocket, hub: HubLink) -> None:
        super().__init__(ws)
        #: The hub writes live messages straight to this socket once a channel is in sync.
        self.direct_socket = ws
        self.session = channel_session(
            self, hub, identity=ws.identity, connection_id=ws.connection_id, kind="websocket"
        )
        #: RPC calls and hooked publishes in flight (made at the first one: most sockets never call)
        self._calls: Calls | None = None
        self._max_subscriptions = conf.get("OFFLOAD_MAX_SUBSCRIPTIONS")
        self._max_bytes = conf.get("OFFLOAD_MAX_MESSAGE_BYTES")
        #: When the connection token runs out (monotonic; None: no token, or closing).
        self._expires_at = expiry_deadline(ws.identity.expires, time.time(), time.monotonic())

    # -- the session's transport ---------------------------------------------------

    def send_reply(self, kind: str, channel: str, text: str, position: StreamId | None) -> None:
        self.ws.send_text(text)

    def send_messages(self, channel: str, entries: list[Entry], frames: bytes | None) -> None:
        if frames is not None:  # one write of the frames the hub joined
            self.ws.send_frame(frames)
        else:
            for entry in entries:
                self.ws.send_frame(entry.frame)

    def can_take_history(self) -> bool:
        # History pages go out one at a time, each once the client took the
        # previous one (the socket wakes us when its queue drains).
        return not self.ws.queued_bytes

    def wake(self) -> None:
        self.ws.wake()

    def subscribe_failed(self, channel: str, ref: Any, code: str, reason: str) -> None:
        self.ws.send_text(error_text(code, reason, ref, channel))

    # -- websocket hooks (the connection's turns) --------------------------------

    def on_open(self) -> None:
        self.session.open()
        query = self.ws.query
        if "channel" in query:  # the worker's one string per name (the session interns it): not one per socket
            query["channel"] = [sys.intern(name) for name in query["channel"]]
        since = self.ws.query.get("since", [None])[-1]
        subscriptions, unreadable = query_subscriptions(
            self.ws.query.get("channel", []), self.ws.query.get("sub_token", [])
        )
        for _ in unreadable:
            self.ws.send_text(error_text("token_invalid", "a sub_token= is not a subscription token"))
        for channel, token in subscriptions.items():
            self._run({"type": "subscribe", "channel": channel, "since": since, "token": token})

    def on_text(self, text: str) -> None:
        self._run(text)

    def on_binary(self, data: bytes) -> None:
        self.ws.send_text(error_text("binary_unsupported", "commands are JSON text messages"))

    def on_wake(self) -> None:
        now = time.monotonic()
        if self._expires_at is not None and now >= self._expires_at:
            log.info(
                "closing the websocket of user %s: its connection token expired",
                self.ws.identity.user_id,
                extra=connection_fields(self.ws),
            )
            self._expires_at = None
            self.ws.disconnect(Disconnect.TOKEN_EXPIRED)
            return
        self.session.step(now)

    def next_deadline(self) -> float | None:
        deadline = self.session.next_deadline()
        if self._expires_at is None:
            return deadline
        return self._expires_at if deadline is None else min(deadline, self._expires_at)

    def on_close(self) -> None:
        self.session.close()
        if self._calls is not None:
            self._calls.close()

    # -- commands ------------------------------------------------------------

    def _run(self, raw: str | dict) -> None:
        ref = None
        channel = None
        try:
            if isinstance(raw, dict):  # from the query string
                channel = raw["channel"]
                obj = {k: v for k, v in raw.items() if v is not None}
                command = command_from_object(obj, max_data_bytes=self._max_bytes)
            else:
                command = parse_command(raw, max_data_bytes=self._max_bytes)
            ref = command.ref
            channel = getattr(command, "channel", None)
            handler = self._handlers[type(command)]
            handler(self, command)
        except RefusedError as exc:
            if ref is None:
                ref, channel = exc.ref, channel or exc.channel
            self.ws.send_text(error_text(exc.code, exc.reason, ref, channel))
        except BackendUnavailable as exc:
            self.ws.send_text(error_text(exc.code, exc.reason, ref, channel))

    def _subscribe(self, command: Subscribe) -> None:
        check_subscribe(self.ws.identity, command.channel, run_blocking, token=command.token)
        self.session.subscribe(command.channel, command.since, command.ref, time.monotonic(), self._max_subscriptions)

    def _unsubscribe(self, command: Unsubscribe) -> None:
        if command.channel in self.session.cursors:
            self.session.unsubscribe(command.channel)
        self.ws.send_text(reply("unsubscribed", command.ref, channel=command.channel))

    def _publish(self, command: Publish) -> None:
        ns = check_publish(self.ws.identity, command.channel, run_blocking)
        if ns.publish_hook is not None:  # the hook runs in a thread; the answer comes from there
            self.calls().publish(ns.publish_hook, command)
            return
        message_id = publish_json(command.channel, command.data_json)
        self.ws.send_text(reply("published", command.ref, channel=command.channel, id=message_id))

    def _rpc(self, command: Rpc) -> None:
        self.calls().rpc(command)

    def calls(self) -> Calls:
        """This socket's calls into project code."""
        if self._calls is None:
            self._calls = Calls(self.ws)
        return self._calls

    def _ping(self, command: Ping) -> None:
        self.ws.send_text(reply("pong", command.ref))

    def _members(self, command: Members) -> None:
        """A page of a presence channel's members: of a channel this client is in, or may subscribe to."""
        if command.channel not in self.session.cursors:
            check_subscribe(self.ws.identity, command.channel, run_blocking)
        page = presence(command.channel, after=command.after, limit=100 if command.limit is None else command.limit)
        members = [info for _, info in page.members]
        self.ws.send_text(
            reply("members", command.ref, channel=command.channel, count=page.count, members=members, next=page.next)
        )

    def _refresh(self, command: Refresh) -> None:
        """A fresh connection token for the same user moves the connection's expiry."""
        identity = self.ws.identity
        if identity.expires is None:
            raise PermissionDenied("this connection was not opened with a connection token")
        claim = verify_connection_token(command.token, now=time.time())
        if str(claim.user_id) != str(identity.user_id):
            raise PermissionDenied("the token is for another user")
        self.ws.identity = run_blocking(token_identity, claim)  # still active, same password
        self._expires_at = expiry_deadline(claim.expires, time.time(), time.monotonic())
        self.ws.send_text(reply("refreshed", command.ref, expires=claim.expires))

    _handlers = {
        Subscribe: _subscribe,
        Unsubscribe: _unsubscribe,
        Publish: _publish,
        Ping: _ping,
        Refresh: _refresh,
        Rpc: _rpc,
        Members: _members,
    }
