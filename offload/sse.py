"""Server-Sent Events: the websocket channels over one long HTTP response.

For clients and proxies that cannot do websockets: ``GET /sse/?channel=C``
streams the same messages, with the same policies, history and gap-free resume.

Theory of operation
-------------------
The view checks everything up front (Origin, channel names, policies, limits,
the resume cursor) and refuses with a JSON 400/403 *before* any byte of the
stream is sent. It then returns a ``StreamingHttpResponse`` whose iterator is
:meth:`SseStream.events`, a generator that uWSGI iterates on the request's own
greenlet: one gevent core per open stream, exactly like a websocket, and no
extra greenlet or thread.

An :class:`SseStream` is a hub subscriber like ``ChannelsEndpoint``: one
:class:`~offload.cursor.ChannelCursor` per channel joins history and live
messages with no gap and no duplicate, and re-syncs after a Redis outage. The
generator sleeps on one event, set by the hub (a message, a channel ready), by
the connection becoming readable (the client closed it) or by
:func:`close_all_streams`; each wake-up it writes everything queued as one chunk.

Resume: there is one ``Last-Event-ID`` for several channels, so every event's
``id:`` carries the position of *every* channel of the stream
(``public:a=1732-0,room:b=1733-5``). A browser reconnects by itself and sends
it back; each channel resumes from its own position.

The end: the client closes (EOF on the socket), a write fails (uWSGI stops
iterating and closes the generator), too many messages queue up
(``OFFLOAD_MAX_QUEUED_BYTES``), Redis stays down past
``OFFLOAD_SUBSCRIBE_TIMEOUT``, or the worker reloads. The generator's
``finally`` always leaves the hub.

The wire format (:func:`format_event`, :func:`format_resume_id`,
:func:`parse_resume_id`, :func:`resume_positions`) is pure; gevent, uwsgi,
redis and Django are imported only where a stream or the view needs them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .cursor import ChannelCursor, Entry
from .exceptions import BackendUnavailable, ChannelError, PermissionDenied, ProtocolError, RefusedError
from .protocol import (
    StreamId,
    error_text,
    format_stream_id,
    parse_stream_id,
    reply,
    validate_channel,
)

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse

__all__ = [
    "PING",
    "RETRY",
    "SseStream",
    "close_all_streams",
    "close_user_streams",
    "format_event",
    "format_resume_id",
    "open_streams",
    "parse_resume_id",
    "resume_positions",
    "stream_view",
]

log = logging.getLogger("offload.sse")

#: First bytes of every stream: reconnect 2 s after the stream ends.
RETRY = b"retry: 2000\n\n"
#: Keep-alive comment: proxies keep the stream open, dead clients fail the write.
PING = b": ping\n\n"

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # SSE's only line breaks (not U+2028 ...)
_RETRY_HISTORY = 1.0  # seconds before re-reading history after a Redis error
_streams: set[SseStream] = set()


# -- the wire format (pure) ---------------------------------------------------


def format_event(data: str | bytes, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE event: ``id:``, ``event:``, one ``data:`` line per line, blank line.

    JSON text has no raw line breaks, so an envelope is one ``data:`` line.

    Raises:
        ValueError: ``event`` or ``event_id`` contains a line break or NUL.
    """
    if isinstance(data, str):
        data = data.encode()
    head = b""
    if event_id is not None:
        head += b"id: " + _field(event_id) + b"\n"
    if event is not None:
        head += b"event: " + _field(event) + b"\n"
    if b"\n" in data or b"\r" in data:
        return head + b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(data)) + b"\n"
    return head + b"data: " + data + b"\n\n"


def _field(value: str) -> bytes:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"an SSE field cannot contain line breaks or NUL: {value!r}")
    return value.encode()


def format_resume_id(positions: Iterable[tuple[str, StreamId]]) -> str:
    """The ``id:`` of an event: ``channel=id`` for every positioned channel, comma-separated."""
    return ",".join(channel + "=" + format_stream_id(position) for channel, position in positions)


_HTTP_BLANKS = " \t"  # the optional whitespace around an HTTP header value


def parse_resume_id(value: str) -> dict[str, StreamId]:
    """Parse a ``Last-Event-ID`` written by :func:`format_resume_id`.

    Channel names may contain ``=`` but ids cannot, so each part splits at its
    last ``=``. A blank value means no positions. Only ASCII digits make an id
    and only HTTP's blanks (space, tab) are trimmed: ``str.strip()`` would also
    take the NBSP and NEL that a Latin-1 decoded header can carry.

    Raises:
        ProtocolError: ``invalid_since`` if any part is malformed.
    """
    positions: dict[str, StreamId] = {}
    value = value.strip(_HTTP_BLANKS)
    if not value:
        return positions
    for part in value.split(","):
        channel, _, position = part.rpartition("=")
        try:
            positions[validate_channel(channel)] = parse_stream_id(position)
        except (ChannelError, ProtocolError):
            raise ProtocolError(
                "Last-Event-ID must be 'channel=id' pairs separated by commas", code="invalid_since"
            ) from None
    return positions


def resume_positions(
    channels: Iterable[str], since: str | None = None, last_event_id: str | None = None
) -> dict[str, StreamId]:
    """Where each channel starts: ``Last-Event-ID`` beats ``since``, channel by channel.

    A channel missing from ``last_event_id`` falls back to ``since``; a channel
    with neither starts "from now" (it is absent from the result).

    Raises:
        ProtocolError: ``invalid_since`` if either value is malformed.
    """
    since_id = None if since is None else parse_stream_id(since)
    resumed = parse_resume_id(last_event_id) if last_event_id else {}
    positions = {}
    for channel in channels:
        position = resumed.get(channel, since_id)
        if position is not None:
            positions[channel] = position
    return positions


# -- one stream (the uWSGI/gevent edge) -------------------------------------------


def open_streams() -> int:
    """SSE streams open in this process."""
    return len(_streams)


def close_user_streams(user_id: int, reason: str) -> int:
    """End every stream of this process opened by user ``user_id``; returns how many."""
    closing = [stream for stream in _streams if stream.identity is not None and stream.identity.user_id == user_id]
    for stream in closing:
        stream.close(reason)
    return len(closing)


def close_all_streams() -> None:
    """End every SSE stream of this process at once (graceful reload).

    The browser reconnects after ``retry`` and resumes with ``Last-Event-ID``.
    """
    for stream in list(_streams):
        stream.close("server restart")


class SseStream:
    """One open event stream: a hub subscriber feeding :meth:`events`.

    Args:
        channels: the channels, already checked against the policies.
        positions: each resumed channel's position (see :func:`resume_positions`).
        worker_id: the uWSGI worker, for the hub's stats.
        slots: this stream's per-IP connection slot (``offload.limits.ConnectionSlots``).
        identity: who opened it (``offload.policies.Identity``), to end it when their session ends.
    """

    def __init__(
        self,
        channels: list[str],
        positions: dict[str, StreamId],
        worker_id: int = 0,
        slots: object = None,
        identity: object = None,
    ) -> None:
        import gevent.event

        from . import conf
        from .hub import get_hub

        self.hub = get_hub(worker_id)
        self.channels = list(channels)
        max_buffer = conf.get("OFFLOAD_MAX_QUEUED_BYTES")
        self.cursors = {channel: ChannelCursor(positions.get(channel), max_buffer) for channel in self.channels}
        #: What the client's Last-Event-ID says: advanced as events are written.
        self.positions = {channel: positions[channel] for channel in self.channels if channel in positions}
        #: Why the stream ended (None while open).
        self.ended: str | None = None
        self._pending: dict[str, float] = {}  # channel -> subscribe time, until its `subscribed`
        self._needs_history: set[str] = set()
        self._retry_at: float | None = None
        self._outbox: deque[tuple[str, StreamId | None, str, str | bytes]] = deque()
        self._queued_bytes = 0  # live events waiting for the client
        self._finish = False  # end after writing what is queued
        self._peer_readable = False
        self._in_hub = False
        self._slots = slots  # offload.limits.ConnectionSlots: this stream's per-IP slot
        self.identity = identity
        #: Our duplicate of the client fd once the stream left the uWSGI request.
        self.detached_fd: int | None = None
        self._wake = gevent.event.Event()
        self._max_queued = conf.get("OFFLOAD_MAX_QUEUED_BYTES")
        self._ping_interval = conf.get("OFFLOAD_PING_INTERVAL")
        self.ping_timeout = conf.get("OFFLOAD_PING_TIMEOUT")
        self._subscribe_timeout = conf.get("OFFLOAD_SUBSCRIBE_TIMEOUT")
        self._page_bytes = conf.get("OFFLOAD_HISTORY_PAGE_BYTES")

    # -- hub callbacks (hub greenlet) -----------------------------------------

    def channel_ready(self, channel: str) -> None:
        if channel in self.cursors:
            self._needs_history.add(channel)
            self._wake.set()

    def channel_lost(self, channel: str) -> None:
        cursor = self.cursors.get(channel)
        if cursor is not None:
            cursor.resync()

    def deliver(self, channel: str, entries: list[Entry], frames: bytes) -> None:
        cursor = self.cursors.get(channel)
        if cursor is None or self.ended is not None:
            return
        admitted = cursor.live_many(entries)
        if admitted is None:  # all of them, in order
            admitted = entries
        if not admitted:
            return
        size = sum(len(entry[1]) for entry in admitted)
        if self._queued_bytes + size > self._max_queued:
            # The client does not read: end the stream, it resumes on reconnect.
            log.info("sse client is a slow consumer (over %d bytes queued): ending its stream", self._max_queued)
            self.close("slow consumer")
            return
        for entry in admitted:
            self._outbox.append((channel, entry[0], "message", entry[1]))
        self._queued_bytes += size
        self._wake.set()

    # -- control (any greenlet) -------------------------------------------------

    def close(self, reason: str) -> None:
        """End the stream now; what is still queued is dropped.

        The hub is left at once: a stream stuck in a write to a client that
        does not read (until uWSGI's socket timeout) receives nothing more.
        """
        if self.ended is None:
            self.ended = reason
            self._outbox.clear()
            self._leave_hub()
            self._wake.set()

    def _leave_hub(self) -> None:
        if self._in_hub:
            self._in_hub = False
            for channel in self.channels:
                self.hub.unsubscribe(self, channel)

    # -- the generator (the request greenlet only) ------------------------------

    def events(self) -> Iterator[bytes]:
        """The response body: ``retry``, then events and pings until the end."""
        import gevent

        fd = _connection_fd()
        watcher = None
        _streams.add(self)
        try:
            if fd is not None:
                watcher = gevent.get_hub().loop.io(fd, 1)
                watcher.start(self._on_readable)
            started = time.monotonic()
            self._in_hub = True
            for channel in self.channels:
                self._pending[channel] = started
                self.hub.subscribe(self, channel)
            yield RETRY
            if self.detached_fd is not None and watcher is not None:
                # The stream left uWSGI's request (see _detached_body): watch our fd.
                watcher.stop()
                fd = self.detached_fd
                watcher = gevent.get_hub().loop.io(fd, 1)
                watcher.start(self._on_readable)
            next_ping = time.monotonic() + self._ping_interval
            while self.ended is None:
                self._wake.wait(timeout=self._timeout(next_ping))
                self._wake.clear()
                if self._peer_readable:
                    self._peer_readable = False
                    if _peer_closed(fd):
                        self.ended = "client closed"
                if self.ended is not None:
                    break
                self._step()
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
            log.exception("sse stream failed")
        finally:
            if self.ended is None:
                self.ended = "closed by the server"  # a failed write: uWSGI closed the generator
            if watcher is not None:
                watcher.stop()
            _streams.discard(self)
            self._leave_hub()
            self._outbox.clear()
            if self._slots is not None:
                self._slots.release()
            log.debug("sse stream ended: %s", self.ended)

    def _on_readable(self) -> None:
        self._peer_readable = True
        self._wake.set()

    def _timeout(self, next_ping: float) -> float:
        deadline = next_ping
        if self._pending:
            deadline = min(deadline, min(self._pending.values()) + self._subscribe_timeout)
        if self._retry_at is not None:
            deadline = min(deadline, self._retry_at)
        return max(0.0, deadline - time.monotonic())

    def _step(self) -> None:
        """Read history where the hub is ready; give up on subscriptions that time out."""
        now = time.monotonic()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
        if self._needs_history and self._retry_at is None:
            for channel in list(self._needs_history):
                self._needs_history.discard(channel)
                self._sync(channel)
        for channel, started in list(self._pending.items()):
            if now - started >= self._subscribe_timeout:
                text = error_text("unavailable", "subscription timed out: Redis unavailable", channel=channel)
                self._outbox.append((channel, None, "error", text))
                self._finish = True  # the client reconnects after `retry` and resumes

    def _sync(self, channel: str) -> None:
        """The Redis subscription is live: queue a page of history; after the last one, go live.

        The next page is read once this one was written: the stream's loop
        yields the queued events to the pump, which writes them to the client
        before the generator runs again.
        """
        cursor = self.cursors[channel]
        first = channel in self._pending
        dropped = cursor.dropped
        try:
            from .history import catch_up  # lazy: the wire format imports no redis/django

            page = catch_up(channel, cursor.last, first, self.hub.newest_id, cursor.page_count, self._page_bytes)
        except BackendUnavailable:
            # Stay SYNCING (live messages keep buffering) and retry shortly.
            self._needs_history.add(channel)
            self._retry_at = time.monotonic() + _RETRY_HISTORY
            return
        cursor.page_count = page.next_count
        tip, recovered = page.tip, page.recovered
        if first:
            del self._pending[channel]
            start = cursor.last if cursor.last is not None else tip
            text = reply(
                "subscribed",
                channel=channel,
                last_id=None if start is None else format_stream_id(start),
                recovered=recovered,
            )
            # A channel with no history yet resumes from 0-0: all it will retain is new.
            self._outbox.append((channel, start or (0, 0), "subscribed", text))
        elif not recovered:
            text = reply("subscribed", channel=channel, last_id=None, recovered=False)
            self._outbox.append((channel, None, "subscribed", text))
        more = page.full or cursor.dropped != dropped
        for entry in cursor.history(page.entries, tip, more=more):
            self._outbox.append((channel, entry[0], "message", entry[1]))
        if more:
            self._needs_history.add(channel)
            self._wake.set()

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


def _connection_fd() -> int | None:
    """The client socket, watched for EOF (None outside uWSGI)."""
    try:
        import uwsgi
    except ImportError:
        return None
    return uwsgi.connection_fd()


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


# -- the Django view ----------------------------------------------------------------


def stream_view(request: HttpRequest) -> HttpResponse:
    """``GET /sse/?channel=C[&channel=D][&since=ID]``: the channels as an event stream.

    Everything is checked before the first byte: a refusal is a JSON
    ``{"error": code, "reason": ...}`` with 400 (bad request) or 403 (origin
    or policy), never a stream that ends at once.
    """
    from django.http import HttpResponseNotAllowed, StreamingHttpResponse

    from . import conf
    from .blocking import run_blocking
    from .connection import install_signal_handlers
    from .limits import ConnectionSlots
    from .policies import check_subscribe
    from .views import _error, origin_allowed, resolve_identity

    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    if not origin_allowed(request.META.get("HTTP_ORIGIN")):
        log.warning("sse refused: origin %r not allowed", request.META.get("HTTP_ORIGIN"))
        return _error(403, "forbidden", "origin not allowed")
    channels = list(dict.fromkeys(request.GET.getlist("channel")))
    if not channels:
        return _error(400, "bad_message", "at least one channel= is required")
    limit = conf.get("OFFLOAD_MAX_SUBSCRIPTIONS")
    if len(channels) > limit:
        return _error(400, "too_many_subscriptions", f"at most {limit} channels per stream")
    try:
        last_event_id = request.headers.get("Last-Event-ID") or request.GET.get("last_event_id")
        positions = resume_positions(channels, request.GET.get("since"), last_event_id)
        identity = resolve_identity(request)
        for channel in channels:
            check_subscribe(identity, channel, run_blocking)
    except RefusedError as exc:
        return _error(403 if isinstance(exc, PermissionDenied) else 400, exc.code, exc.reason)
    slots = ConnectionSlots(
        request.META.get("REMOTE_ADDR", ""),
        conf.get("OFFLOAD_MAX_CONNECTIONS_PER_IP"),
        stale_after=3 * conf.get("OFFLOAD_PING_INTERVAL"),
    )
    if not slots.acquire():
        return _error(429, "too_many_connections", "too many connections from this address")
    install_signal_handlers()
    stream = SseStream(channels, positions, _worker_id(), slots, identity)
    response = StreamingHttpResponse(_detached_body(stream), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events through at once
    return response


def _detached_body(stream: SseStream) -> Iterator[bytes]:
    """The response body as uWSGI sees it: headers and the first chunk only.

    Then the stream takes the socket over (a duplicate fd) and goes on from its
    own greenlet, and the uWSGI request ends: an open stream, like an open
    websocket, holds no async core, only its Python objects.
    """
    events = stream.events()
    yield next(events)  # uWSGI writes the headers and ``retry`` with it
    try:
        import uwsgi
    except ImportError:  # not under uWSGI (tests of the view): stream in place
        yield from events
        return
    import gevent

    stream.detached_fd = os.dup(uwsgi.connection_fd())
    gevent.spawn(_pump, events, stream.detached_fd, stream.ping_timeout)


def _pump(events: Iterator[bytes], fd: int, timeout: float) -> None:
    """Write the stream's chunks to its detached socket until it ends."""
    from gevent.socket import wait_write

    from .connection import _close_now

    try:
        for chunk in events:
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    wait_write(fd, timeout=timeout)  # a client that stopped reading times out
    except OSError as exc:  # gone, or not reading: end the stream
        log.debug("sse stream dropped: %s", exc)
    finally:
        events.close()  # stops the stream's watcher on fd
        _close_now(fd)


def _worker_id() -> int:
    try:
        import uwsgi
    except ImportError:
        return 0
    return uwsgi.worker_id()
