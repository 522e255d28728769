"""Server-Sent Events: the websocket channels over one long HTTP response.

For clients and proxies that cannot do websockets: ``GET /sse/?channel=C``
streams the same messages, with the same policies, history and gap-free resume.

Theory of operation
-------------------
The view (``offload.views.stream_view``) checks everything up front (Origin,
channel names, policies, limits, the resume cursor) and refuses with a JSON
400/403 *before* any byte of the stream is sent. It then returns a
``StreamingHttpResponse`` around :func:`response_body`: uWSGI writes the
headers and the first chunk (``retry``) on the request's greenlet, then the
stream takes the socket over (:func:`offload.transports.sockets.detach`, the same detach
path as websockets) and a greenlet of its own writes the rest, so an open
stream holds no async core, only its Python objects.

An :class:`SseStream` is the event-stream transport of a
:class:`~offload.core.session.ChannelSession`, the same session a websocket runs:
subscriptions, history pages, re-syncs after a Redis outage and live delivery
are written once there. The stream formats what the session sends as events
into an outbox; its generator sleeps on one event, set by the session (a
message, a channel ready), by the connection becoming readable (the client
closed it) or by :func:`close_all_streams`; each wake-up it writes everything
queued as one chunk. The next history page is read only once that chunk was
written: the generator does not run while the pump writes.

Resume: there is one ``Last-Event-ID`` for several channels, so every event's
``id:`` carries the position of *every* channel of the stream
(``public:a=1732-0,room:b=1733-5``). A browser reconnects by itself and sends
it back; each channel resumes from its own position.

The end: the client closes (EOF on the socket), a write fails, too much
queues up (``OFFLOAD_MAX_QUEUED_BYTES``), Redis stays down past
``OFFLOAD_SUBSCRIBE_TIMEOUT``, the user's session ends, the connection token
expires (an ``error`` event ``token_expired`` first: an EventSource cannot
refresh in place, so the client reconnects with a fresh token), or the worker
reloads. The generator's ``finally`` always leaves the hub.

The wire format is pure, in :mod:`offload.core.sse_format`.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
from gevent.socket import wait_write

from .. import conf, metrics
from ..core.closes import Disconnect
from ..core.cursor import Entry
from ..core.protocol import StreamId, error_text
from ..core.session import HubLink
from ..core.sse_format import PING, RETRY, format_event, format_resume_id
from ..logs import connection_fields, log_connection
from ..tokens import expiry_deadline
from .lifecycle import new_connection_id
from .sessions import channel_session
from .sockets import close_now, detach, no_delay

__all__ = ["SseStream", "close_all_streams", "close_user_streams", "open_streams", "queued_bytes", "response_body"]

log = logging.getLogger("offload.transports.sse")

_streams: set[SseStream] = set()


# -- one stream (the uWSGI/gevent edge) -------------------------------------------


def open_streams() -> int:
    """SSE streams open in this process."""
    return len(_streams)


def queued_bytes() -> int:
    """Bytes of events waiting for this process's streams' clients (the metrics sampler reads it)."""
    return sum(stream._queued_bytes for stream in _streams)


def close_user_streams(user_id: int, why: Disconnect) -> int:
    """End every stream of this process opened by user ``user_id``; returns how many."""
    closing = [stream for stream in _streams if stream.identity is not None and stream.identity.user_id == user_id]
    for stream in closing:
        stream.close(why.reason)
    return len(closing)


def close_all_streams(why: Disconnect = Disconnect.RESTART) -> None:
    """End every SSE stream of this process at once (graceful reload, shutdown).

    The browser reconnects after ``retry`` and resumes with ``Last-Event-ID``.
    """
    for stream in list(_streams):
        stream.close(why.reason)


class SseStream:
    """One open event stream: the event-stream transport of a channel session.

    Args:
        channels: the channels, already checked against the policies.
        positions: each resumed channel's position (see :func:`resume_positions`).
        hub: this process's hub.
        slots: this stream's per-IP connection slot (``offload.backend.slots.ConnectionSlots``).
        identity: who opened it (``offload.policies.Identity``), to end it when their session ends.
        fd: the client socket, watched for EOF (None: not under uWSGI).
        connection_id: its id (:func:`~offload.transports.lifecycle.new_connection_id`; a new one by default).
    """

    #: The hub never writes to an event stream itself: events need their ids.
    direct_socket = None

    def __init__(
        self,
        channels: list[str],
        positions: dict[str, StreamId],
        hub: HubLink,
        slots: Any = None,
        identity: Any = None,
        fd: int | None = None,
        connection_id: str | None = None,
    ) -> None:
        self.channels = list(channels)
        #: random hex, unique per connection (lifecycle signals, logs; its slot's member id)
        self.connection_id = connection_id or new_connection_id()
        self.session = channel_session(self, hub, identity=identity, connection_id=self.connection_id, kind="sse")
        self._start = {channel: positions.get(channel) for channel in self.channels}
        #: What the client's Last-Event-ID says: advanced as events are written.
        self.positions = {channel: positions[channel] for channel in self.channels if channel in positions}
        #: Why the stream ended (None while open).
        self.ended: str | None = None
        self._outbox: deque[tuple[str, StreamId | None, str, str | bytes]] = deque()
        self._queued_bytes = 0  # events waiting for the client
        self._finish = False  # end after writing what is queued
        self._peer_readable = False
        self._slots = slots
        self.identity = identity
        self.fd = fd
        self._watcher = None
        self._wake = gevent.event.Event()
        self._max_queued = conf.get("OFFLOAD_MAX_QUEUED_BYTES")
        self._ping_interval = conf.get("OFFLOAD_PING_INTERVAL")
        self.ping_timeout = conf.get("OFFLOAD_PING_TIMEOUT")
        #: When the connection token runs out (monotonic; None: no token).
        self._expires_at = expiry_deadline(getattr(identity, "expires", None), time.time(), time.monotonic())

    @property
    def cursors(self) -> dict:
        return self.session.cursors

    # -- the session's transport ---------------------------------------------------

    def send_reply(self, kind: str, channel: str, text: str, position: StreamId | None) -> None:
        self._outbox.append((channel, position, kind, text))
        self._wake.set()

    def send_messages(self, channel: str, entries: list[Entry], frames: bytes | None) -> None:
        if self.ended is not None:
            return
        size = sum(len(entry.text) for entry in entries)
        if self._queued_bytes + size > self._max_queued:
            # The client does not read: end the stream, it resumes on reconnect.
            log.info(
                "sse client is a slow consumer (over %d bytes queued): ending its stream",
                self._max_queued,
                extra=connection_fields(self),
            )
            self.close(Disconnect.SLOW_CONSUMER.reason)
            return
        for entry in entries:
            self._outbox.append((channel, entry.id, "message", entry.text))
        self._queued_bytes += size
        self._wake.set()

    def can_take_history(self) -> bool:
        return True  # the generator runs only once the pump wrote the last chunk

    def wake(self) -> None:
        self._wake.set()

    def subscribe_failed(self, channel: str, ref: Any, code: str, reason: str) -> None:
        self._outbox.append((channel, None, "error", error_text(code, reason, channel=channel)))
        self._finish = True  # the client reconnects after `retry` and resumes

    # -- control (any greenlet) -------------------------------------------------

    def close(self, reason: str) -> None:
        """End the stream now; what is still queued is dropped.

        The hub is left at once: a stream stuck in a write to a client that
        does not read receives nothing more.
        """
        if self.ended is None:
            self.ended = reason
            self._outbox.clear()
            self.session.close()
            self._wake.set()

    # -- the generator ------------------------------------------------------------

    def start(self, now: float) -> None:
        """Subscribe the stream's channels (the generator does, before its first byte)."""
        for channel in self.channels:
            self.session.subscribe(channel, self._start[channel], None, now, len(self.channels))

    def events(self) -> Iterator[bytes]:
        """The response body: ``retry``, then events and pings until the end."""
        _streams.add(self)
        metrics.connection_opened("sse")
        log_connection(log, logging.DEBUG, self, "sse stream open")
        try:
            self.watch(self.fd)
            self.session.open()
            self.start(time.monotonic())
            yield RETRY
            next_ping = time.monotonic() + self._ping_interval
            while self.ended is None:
                self._wake.wait(timeout=self._timeout(next_ping))
                self._wake.clear()
                if self._peer_readable:
                    self._peer_readable = False
                    if _peer_closed(self.fd):
                        self.ended = "client closed"
                if self.ended is not None:
                    break
                if self._expires_at is not None and time.monotonic() >= self._expires_at:
                    self._token_expired()
                self.session.step(time.monotonic())
                chunk = self._drain()
                if chunk:
                    yield chunk
                    next_ping = time.monotonic() + self._ping_interval
                elif time.monotonic() >= next_ping:
                    yield PING
                    next_ping = time.monotonic() + self._ping_interval
                    if self._slots is not None:
                        self._slots.refresh()
                if self._finish:
                    self.ended = self.ended or "finished"
        except Exception:
            self.ended = "internal error"
            log.exception("sse stream failed", extra=connection_fields(self))
        finally:
            if self.ended is None:
                self.ended = "closed by the server"  # a failed write: the generator was closed
            self.watch(None)
            _streams.discard(self)
            metrics.stream_ended(self.ended, self.identity)
            self.session.close()
            self._outbox.clear()
            if self._slots is not None:
                self._slots.release()
            log_connection(log, logging.DEBUG, self, "sse stream ended: %s", self.ended)

    def watch(self, fd: int | None) -> None:
        """Watch ``fd`` for the client closing (None: stop watching)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self.fd = fd
        if fd is not None:
            self._watcher = gevent.get_hub().loop.io(fd, 1)
            self._watcher.start(self._on_readable)

    def _token_expired(self) -> None:
        """Tell the client why, then end: it reconnects with a fresh token and resumes."""
        self._expires_at = None
        self._outbox.append(("", None, "error", error_text("token_expired", "the connection token expired")))
        self._finish = True

    def _on_readable(self) -> None:
        self._peer_readable = True
        self._wake.set()

    def _timeout(self, next_ping: float) -> float:
        deadline = next_ping
        for other in (self.session.next_deadline(), self._expires_at):
            if other is not None:
                deadline = min(deadline, other)
        return max(0.0, deadline - time.monotonic())

    def _drain(self) -> bytes:
        """Format everything queued, advancing the resume id event by event."""
        outbox = self._outbox
        if not outbox:
            return b""
        parts = []
        resume_id = None
        while outbox:
            channel, stream_id, event, data = outbox.popleft()
            if stream_id is not None or resume_id is None:
                if stream_id is not None:
                    self.positions[channel] = stream_id
                resume_id = format_resume_id((c, self.positions[c]) for c in self.channels if c in self.positions)
            parts.append(format_event(data, event=event, event_id=resume_id or None))
        self._queued_bytes = 0
        return b"".join(parts)


def _peer_closed(fd: int | None) -> bool:
    """Did the client close the connection? (It sends nothing after its request.)"""
    if fd is None:
        return False
    try:
        return not os.read(fd, 4096)  # b"": EOF; bytes: ignored (the request is done)
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno != errno.EINTR


def response_body(stream: SseStream, detach_fd: bool = True) -> Iterator[bytes]:
    """The response body as uWSGI sees it: headers and the first chunk only.

    Then the stream takes the socket over (:func:`offload.transports.sockets.detach`)
    and goes on from a greenlet of its own, and the uWSGI request ends: an
    open stream, like an open websocket, holds no async core, only its Python
    objects. ``detach_fd=False`` (not under uWSGI: tests of the view) streams
    in place instead.
    """
    events = stream.events()
    yield next(events)  # uWSGI writes the headers and ``retry`` with it
    if not detach_fd or stream.fd is None:
        yield from events
        return
    fd = detach(stream.fd)
    no_delay(fd)
    stream.watch(fd)
    gevent.spawn(_pump, stream, events, fd, stream.ping_timeout)


def _pump(stream: SseStream, events: Iterator[bytes], fd: int, timeout: float) -> None:
    """Write the stream's chunks to its detached socket until it ends."""
    try:
        for chunk in events:
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    wait_write(fd, timeout=timeout)  # a client that stopped reading times out
    except OSError as exc:  # gone, or not reading: end the stream
        log_connection(log, logging.DEBUG, stream, "sse stream dropped: %s", exc)
    finally:
        events.close()  # stops the stream's watcher on fd
        close_now(fd)
