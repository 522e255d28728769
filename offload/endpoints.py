"""The two websocket endpoints: channels (``/ws/``) and echo (``/ws/echo``).

:class:`ChannelsEndpoint` speaks the JSON protocol of ``docs/protocol.md``:
it checks namespace policies, registers channels with the worker's hub and
runs one :class:`~offload.cursor.ChannelCursor` per subscription so that
history and live messages join with no gap and no duplicate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from . import conf
from .blocking import run_blocking
from .connection import Endpoint, WebSocket
from .cursor import ChannelCursor, Entry
from .exceptions import BackendUnavailable, LimitExceeded, RefusedError
from .history import catch_up
from .hub import get_hub
from .policies import check_publish, check_subscribe
from .protocol import (
    Ping,
    Publish,
    StreamId,
    Subscribe,
    Unsubscribe,
    command_from_object,
    error_text,
    format_stream_id,
    parse_command,
    reply,
)
from .publishing import publish_json

__all__ = ["ChannelsEndpoint", "EchoEndpoint"]

log = logging.getLogger("offload.endpoints")

_RETRY_HISTORY = 1.0  # seconds before re-reading history after a Redis error


class EchoEndpoint(Endpoint):
    """Echo every message back with its type (text as text, binary as binary)."""

    def on_text(self, text: str) -> None:
        self.ws.send_text(text)

    def on_binary(self, data: bytes) -> None:
        self.ws.send_binary(data)


@dataclass
class _Pending:
    """A subscribe command waiting for the hub's Redis subscription."""

    ref: Any
    since_given: bool
    started: float


class ChannelsEndpoint(Endpoint):
    """Subscribe/unsubscribe/publish/ping over JSON text messages."""

    def __init__(self, ws: WebSocket) -> None:
        super().__init__(ws)
        self.hub = get_hub(ws.worker_id)
        self.cursors: dict[str, ChannelCursor] = {}
        self._pending: dict[str, _Pending] = {}
        self._needs_history: set[str] = set()
        self._direct: set[str] = set()  # channels the hub writes straight to our socket
        self._retry_at: float | None = None
        self._max_subscriptions = conf.get("OFFLOAD_MAX_SUBSCRIPTIONS")
        self._subscribe_timeout = conf.get("OFFLOAD_SUBSCRIBE_TIMEOUT")
        self._max_bytes = conf.get("OFFLOAD_MAX_MESSAGE_BYTES")
        self._max_buffer = conf.get("OFFLOAD_MAX_QUEUED_BYTES")
        self._page_bytes = conf.get("OFFLOAD_HISTORY_PAGE_BYTES")

    # -- hub callbacks (hub greenlet) -----------------------------------------

    def channel_ready(self, channel: str) -> None:
        if channel in self.cursors:
            self._needs_history.add(channel)
            self.ws.wake()

    def channel_lost(self, channel: str) -> None:
        cursor = self.cursors.get(channel)
        if cursor is not None:
            self._position(channel)
            cursor.resync()
        self._direct.discard(channel)

    def deliver(self, channel: str, entries: list[Entry], frames: bytes) -> None:
        cursor = self.cursors.get(channel)
        if cursor is None:
            return
        admitted = cursor.live_many(entries)
        if admitted is None:  # plain live delivery: one write of the pre-joined frames
            self.ws.send_frame(frames)
            if channel not in self._direct:  # the hub has caught up with us: let it write directly
                self._write_directly(channel)
            return
        for entry in admitted:
            self.ws.send_frame(entry[2])

    def _write_directly(self, channel: str) -> None:
        self._direct.add(channel)
        self.hub.write_directly_to(self, channel, self.ws)

    def _position(self, channel: str) -> StreamId | None:
        """The id of the newest message sent on ``channel`` (brings the cursor
        up to date with what the hub wrote directly)."""
        cursor = self.cursors[channel]
        if channel in self._direct:
            fanned = self.hub.last_fanned_out(channel)
            if fanned is not None and (cursor.last is None or fanned > cursor.last):
                cursor.last = fanned
        return cursor.last

    # -- websocket hooks (connection greenlet) ----------------------------------

    def on_open(self) -> None:
        since = self.ws.query.get("since", [None])[-1]
        for channel in self.ws.query.get("channel", []):
            self._run({"type": "subscribe", "channel": channel, "since": since})

    def on_text(self, text: str) -> None:
        self._run(text)

    def on_binary(self, data: bytes) -> None:
        self.ws.send_text(error_text("binary_unsupported", "commands are JSON text messages"))

    def on_wake(self) -> None:
        now = time.monotonic()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
        # History pages go out one at a time, each once the client took the
        # previous one (the socket woke us when its queue drained).
        if self._needs_history and self._retry_at is None and not self.ws.queued_bytes:
            for channel in list(self._needs_history):
                self._needs_history.discard(channel)
                self._sync(channel)
        for channel, pending in list(self._pending.items()):
            if now - pending.started >= self._subscribe_timeout:
                self._drop(channel)
                self.ws.send_text(
                    error_text("unavailable", "subscription timed out: Redis unavailable", pending.ref, channel)
                )

    def next_deadline(self) -> float | None:
        deadlines = [p.started + self._subscribe_timeout for p in self._pending.values()]
        if self._retry_at is not None:
            deadlines.append(self._retry_at)
        return min(deadlines) if deadlines else None

    def on_close(self) -> None:
        for channel in list(self.cursors):
            self.hub.unsubscribe(self, channel)
        self.cursors.clear()

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
        channel = command.channel
        check_subscribe(self.ws.identity, channel, run_blocking)
        if channel in self.cursors:
            if channel not in self._pending:
                position = self._position(channel)
                last = None if position is None else format_stream_id(position)
                self.ws.send_text(reply("subscribed", command.ref, channel=channel, last_id=last, recovered=True))
            return
        if len(self.cursors) >= self._max_subscriptions:
            raise LimitExceeded(
                f"at most {self._max_subscriptions} subscriptions per connection", code="too_many_subscriptions"
            )
        self.cursors[channel] = ChannelCursor(command.since, self._max_buffer)
        self._pending[channel] = _Pending(command.ref, command.since is not None, time.monotonic())
        self.hub.subscribe(self, channel)

    def _unsubscribe(self, command: Unsubscribe) -> None:
        if command.channel in self.cursors:
            self._drop(command.channel)
        self.ws.send_text(reply("unsubscribed", command.ref, channel=command.channel))

    def _publish(self, command: Publish) -> None:
        check_publish(self.ws.identity, command.channel, run_blocking)
        message_id = publish_json(command.channel, command.data_json)
        self.ws.send_text(reply("published", command.ref, channel=command.channel, id=message_id))

    def _ping(self, command: Ping) -> None:
        self.ws.send_text(reply("pong", command.ref))

    _handlers = {Subscribe: _subscribe, Unsubscribe: _unsubscribe, Publish: _publish, Ping: _ping}

    # -- history ---------------------------------------------------------------

    def _drop(self, channel: str) -> None:
        self.cursors.pop(channel, None)
        self._pending.pop(channel, None)
        self._needs_history.discard(channel)
        self._direct.discard(channel)
        self.hub.unsubscribe(self, channel)

    def _sync(self, channel: str) -> None:
        """The Redis subscription is live: read a page of history; after the last one, go live."""
        cursor = self.cursors.get(channel)
        if cursor is None:
            return
        pending = self._pending.get(channel)
        dropped = cursor.dropped
        try:
            page = catch_up(
                channel, cursor.last, pending is not None, self.hub.newest_id, cursor.page_count, self._page_bytes
            )
        except BackendUnavailable:
            # Stay SYNCING (live messages keep buffering) and retry shortly.
            self._needs_history.add(channel)
            self._retry_at = time.monotonic() + _RETRY_HISTORY
            return
        if self.cursors.get(channel) is not cursor:
            return  # unsubscribed while history was read
        cursor.page_count = page.next_count
        tip, recovered = page.tip, page.recovered
        if pending is not None:
            del self._pending[channel]
            start = cursor.last if cursor.last is not None else tip
            self.ws.send_text(
                reply(
                    "subscribed",
                    pending.ref,
                    channel=channel,
                    last_id=None if start is None else format_stream_id(start),
                    recovered=recovered,
                )
            )
        elif not recovered:
            self.ws.send_text(reply("subscribed", None, channel=channel, last_id=None, recovered=False))
        # Another page when this one was full, or when live messages were
        # dropped from the cursor's buffer while it was read (history has them).
        more = page.full or cursor.dropped != dropped
        for entry in cursor.history(page.entries, tip, more=more):
            self.ws.send_frame(entry[2])
        if more:
            self._needs_history.add(channel)
            self.ws.wake()  # the next page: now if the kernel took this one, else once the queue drains
            return
        # Live from here on. Once every id the hub will fan out is newer than
        # what we sent, the hub may write to our socket itself; otherwise the
        # first plain live delivery switches (see deliver).
        fanned = self.hub.last_fanned_out(channel)
        if cursor.last is None or (fanned is not None and fanned >= cursor.last):
            self._write_directly(channel)
