"""One websocket's life, on its own request greenlet (the uWSGI/gevent edge).

Theory of operation
-------------------
uWSGI performs the handshake (``uwsgi.websocket_handshake``, on the request's
own greenlet). From then on the connection owns ``uwsgi.connection_fd()``:

* Reading: client frames are *not* read with uWSGI's unsafe receive path; the
  greenlet reads raw bytes and feeds :class:`offload.frames.FrameReader`
  (wsproto).
* Writing: every frame (data and control) goes through :meth:`WebSocket.send_frame`,
  callable from any greenlet. When nothing is pending it is one non-blocking
  ``os.write`` of complete frame bytes, done by the caller: the hub writes a
  message it framed once to every socket without waking their greenlets.
  Whatever the kernel does not take is queued and flushed by a write watcher
  when the socket drains; a socket whose queue would grow past
  ``OFFLOAD_MAX_QUEUED_BYTES`` is a slow consumer and is closed (1008). One
  writer at a time (gevent is cooperative and a write never yields), so
  frames never interleave.
* Limits: every client frame (data, each fragment of a message, ping, pong)
  takes a token from the connection's bucket; a client over its rate is
  closed with 1008, and one that keeps sending while we close is dropped.
  One wake-up reads at most ``_READS_PER_WAKE`` chunks, so a flooding socket
  cannot keep the worker's other sockets waiting.

The greenlet sleeps on one event, set by: the fd became readable (a libev io
watcher), a close was requested, or the next timer. Each wake-up it drains
everything readable.

Lifecycle::

    state     event                                   next
    --------  --------------------------------------  --------
    OPEN      peer close frame -> echo it             CLOSED
    OPEN      close(code) by us -> send close frame   CLOSING
    OPEN      protocol error -> close 1002/1007/1009  CLOSED
    OPEN      no pong/data within ping timeout        CLOSED (1011)
    OPEN      outgoing queue over the limit           CLOSING (1008)
    OPEN      client frames over the rate limit       CLOSING (1008)
    CLOSING   client frames over the rate limit       CLOSED
    OPEN      queued bytes stuck for the ping timeout CLOSED
    CLOSING   peer close frame, EOF or 2 s timeout    CLOSED
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import random
import time
from collections import deque

import gevent
import gevent.event
import gevent.socket

from . import conf
from .closes import Disconnect
from .frames import (
    BinaryReceived,
    CloseReceived,
    FragmentReceived,
    FrameReader,
    PingReceived,
    PongReceived,
    ProtocolFailure,
    TextReceived,
    frame_binary,
    frame_text,
)
from .limits import ConnectionSlots, TokenBucket, cooldowns
from .policies import Identity
from .sockets import close_now, detach, shutdown_write

__all__ = ["Endpoint", "WebSocket", "close_all", "close_user", "open_connections"]


log = logging.getLogger("offload.connection")

_CLOSE_GRACE = 2.0  # seconds to wait for the peer's close frame
_READ_SIZE = 65536
_READS_PER_WAKE = 16  # chunks read per wake-up before the other greenlets get a turn
_open: set[WebSocket] = set()


def open_connections() -> int:
    """Websockets open in this process."""
    return len(_open)


def close_all(why: Disconnect = Disconnect.RESTART) -> None:
    """Send every websocket of this process a close frame now (reload, shutdown)."""
    for ws in list(_open):
        ws.disconnect(why)


def close_user(user_id: int, why: Disconnect) -> int:
    """Close every websocket of this process opened by user ``user_id``; returns how many."""
    closing = [ws for ws in _open if ws.identity.user_id == user_id]
    for ws in closing:
        ws.disconnect(why)
    return len(closing)


class State(enum.IntEnum):
    OPEN = 0
    CLOSING = 1
    CLOSED = 2


class Endpoint:
    """What runs on a websocket. Subclass and override the ``on_*`` hooks.

    All hooks run on the connection's own greenlet, so they may call
    ``self.ws.send_text()`` and block on Redis (gevent-cooperatively).
    """

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    def on_open(self) -> None: ...

    def on_text(self, text: str) -> None: ...

    def on_binary(self, data: bytes) -> None: ...

    def on_wake(self) -> None:
        """Called on every wake-up, after incoming data was handled."""

    def next_deadline(self) -> float | None:
        """Monotonic time at which ``on_wake`` must run at the latest."""
        return None

    def on_close(self) -> None: ...


class WebSocket:
    """An upgraded connection: outgoing queue, reader, timers."""

    def __init__(
        self,
        fd: int,
        identity: Identity,
        query: dict[str, list[str]],
        worker_id: int = 0,
        slots: ConnectionSlots | None = None,
    ) -> None:
        self.fd = fd
        self.identity = identity
        self.query = query
        self.worker_id = worker_id
        self.state = State.OPEN
        self.close_code: int | None = None
        self._reader = FrameReader(conf.get("OFFLOAD_MAX_MESSAGE_BYTES"))
        self._out: deque[bytes | memoryview] = deque()
        self._queued_bytes = 0
        self._max_queued = conf.get("OFFLOAD_MAX_QUEUED_BYTES")
        self._wake = gevent.event.Event()
        self._ping_interval = conf.get("OFFLOAD_PING_INTERVAL")
        self._ping_timeout = conf.get("OFFLOAD_PING_TIMEOUT")
        self._closing_since = 0.0
        self._stuck_since: float | None = None
        self._slots = slots
        self._bucket = TokenBucket(conf.get("OFFLOAD_MAX_MESSAGES_PER_SECOND"), conf.get("OFFLOAD_MESSAGE_BURST"))
        self._control_bucket = TokenBucket(
            conf.get("OFFLOAD_MAX_CONTROL_FRAMES_PER_SECOND"), conf.get("OFFLOAD_CONTROL_FRAME_BURST")
        )
        self._write_watcher = gevent.get_hub().loop.io(fd, 2)
        self._owns_fd = False

    # -- API for endpoints and the hub (any greenlet) --------------------------

    def send_text(self, text: str) -> None:
        """Send a text message (framed here; see :meth:`send_frame`)."""
        self.send_frame(frame_text(text.encode()))

    def send_binary(self, data: bytes) -> None:
        self.send_frame(frame_binary(data))

    def offer(self, frames: bytes) -> bool:
        """The hub's fan-out: write ``frames`` now unless the socket must keep
        its order (it is closing, or has bytes queued: writing past them would
        reorder the stream). Returns False then, and the hub delivers through
        the socket's subscriber instead. What the kernel does not take is
        queued as by :meth:`send_frame`. One ``os.write`` and nothing else:
        this runs once per socket for every message of a channel.
        """
        if self.state or self._out:  # State.OPEN is 0
            return False
        try:
            written = os.write(self.fd, frames)
        except BlockingIOError:
            written = 0
        except OSError:
            self._broken()
            return True
        if written != len(frames):
            self._queue_unsent(frames, written)
        return True

    def send_frame(self, frame: bytes) -> None:
        """Send complete frame bytes now, or queue what the socket cannot take.

        Nothing is sent once the connection is closing.
        """
        if self.state is State.OPEN:
            self._write(frame)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (from any greenlet)."""
        if self.state is State.OPEN:
            self.close_code = code
            self._write(self._reader.close(code, reason))
            if self.state is State.OPEN:
                self.state = State.CLOSING
                self._closing_since = time.monotonic()
            self._wake.set()

    def disconnect(self, why: Disconnect) -> None:
        """Close with the code and reason of ``why`` (from any greenlet)."""
        self.close(why.code, why.reason)

    def wake(self) -> None:
        self._wake.set()

    @property
    def queued(self) -> int:
        """Frames (or parts of one) waiting for the socket to drain."""
        return len(self._out)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the socket to drain (bounded by ``OFFLOAD_MAX_QUEUED_BYTES``).

        When it falls back to 0 the connection's greenlet is woken, so an
        endpoint that waits for the client to read (a history replay sent
        page by page) can go on.
        """
        return self._queued_bytes

    # -- writing ------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        out = self._out
        if not out:
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                self._broken()
                return
            if written != len(data):
                self._queue_unsent(data, written)
            return
        if self._queued_bytes + len(data) > self._max_queued and self.state is State.OPEN:
            # The client does not read. Keep the frame being written (it may
            # be half sent), drop the rest, never slow the others down.
            head = out.popleft()
            out.clear()
            out.append(head)
            self._queued_bytes = len(head)
            log.info("websocket peer is a slow consumer (over %d bytes queued): closing it with 1008", self._max_queued)
            self.disconnect(Disconnect.SLOW_CONSUMER)
            return
        out.append(data)
        self._queued_bytes += len(data)

    def _queue_unsent(self, data: bytes | memoryview, written: int) -> None:
        """The kernel took ``written`` bytes of ``data`` (the queue being empty):
        keep the rest and flush it when the socket drains."""
        rest = memoryview(data)[written:]
        self._out.append(rest)
        self._queued_bytes += len(rest)
        self._stuck_since = time.monotonic()
        self._write_watcher.start(self._on_writable)

    def _on_writable(self) -> None:
        """Flush queued bytes (runs in the event loop when the socket drains)."""
        out = self._out
        try:
            while out:
                data = out[0]
                written = os.write(self.fd, data)
                self._queued_bytes -= written
                if written < len(data):
                    out[0] = memoryview(data)[written:]
                    self._stuck_since = time.monotonic()
                    return
                out.popleft()
        except BlockingIOError:
            return
        except OSError:
            self._broken()
            return
        self._stuck_since = None
        self._write_watcher.stop()
        self._wake.set()  # drained: an endpoint waiting to send more (history pages) goes on

    def _broken(self) -> None:
        """The peer is gone (EPIPE, ECONNRESET): stop at once."""
        self._out.clear()
        self._queued_bytes = 0
        self._write_watcher.stop()
        self.state = State.CLOSED
        self._wake.set()

    def detach(self) -> None:
        """Take the socket over from uWSGI, freeing the request's async core.

        The connection keeps a duplicate of the client fd; uWSGI then ends
        the request as usual and closes its own fd, while the TCP connection
        stays open through ours. An open websocket then costs no uWSGI core
        (each core keeps about 20 KB: its request struct and header buffer),
        only its Python objects, and ``CORES`` bounds concurrent *requests*
        rather than open sockets. Call it before any data is exchanged.
        """
        self._write_watcher.stop()
        self.fd = detach(self.fd)
        self._owns_fd = True
        self._write_watcher = gevent.get_hub().loop.io(self.fd, 2)

    # -- the loop ----------------------------------------------------------------

    def run(self, endpoint: Endpoint) -> None:
        """Serve the websocket until it closes."""
        watcher = gevent.get_hub().loop.io(self.fd, 1)
        watcher.start(self._wake.set)
        _open.add(self)
        now = time.monotonic()
        self._last_heard = now
        # The first ping comes after a random 0.5-1 interval: sockets that
        # connected together (a storm, a reload) do not all ping together.
        self._next_ping = now + self._ping_interval * random.uniform(0.5, 1.0)
        self._ping_sent: float | None = None
        try:
            endpoint.on_open()
            while self.state is not State.CLOSED:
                self._wake.wait(timeout=self._timeout(endpoint))
                self._wake.clear()
                self._read(endpoint)
                if self.state is State.OPEN:
                    endpoint.on_wake()
                self._timers()
        except Exception:
            log.exception("websocket endpoint failed")
            self.disconnect(Disconnect.INTERNAL_ERROR)
        finally:
            watcher.stop()
            self._write_watcher.stop()
            _open.discard(self)
            if self._slots is not None:
                self._slots.release()
            self.state = State.CLOSED
            self._out.clear()
            self._queued_bytes = 0
            try:
                endpoint.on_close()
            except Exception:
                log.exception("websocket on_close failed")
            if self._owns_fd:
                close_now(self.fd)

    def _timeout(self, endpoint: Endpoint) -> float:
        if self._ping_sent is not None:  # one ping at a time: wait for its answer
            deadline = self._ping_sent + self._ping_timeout
        else:
            deadline = self._next_ping
        if self.state is State.CLOSING:
            deadline = min(deadline, self._closing_since + _CLOSE_GRACE)
        if self._stuck_since is not None:
            deadline = min(deadline, self._stuck_since + self._ping_timeout)
        extra = endpoint.next_deadline()
        if extra is not None:
            deadline = min(deadline, extra)
        return max(0.0, deadline - time.monotonic())

    def _read(self, endpoint: Endpoint) -> None:
        for _ in range(_READS_PER_WAKE):
            if self.state is State.CLOSED:
                return
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                data = b""
            self._last_heard = now = time.monotonic()
            self._ping_sent = None
            if self.state is State.CLOSING and now - self._closing_since >= _CLOSE_GRACE:
                self.state = State.CLOSED  # a client that keeps sending after our close
                return
            for event in self._reader.events(data or None):
                if not self._handle(event, endpoint):
                    break  # over the rate limit: leave the rest unparsed
            if not data:
                self.state = State.CLOSED
                return
        # More is readable (the io watcher fires again): the other sockets first.

    def _handle(self, event, endpoint: Endpoint) -> bool:
        """Act on one client event; False when no more should be parsed now."""
        if not isinstance(event, (CloseReceived, ProtocolFailure)) and not (
            self._bucket.allow()
            and (not isinstance(event, (PingReceived, PongReceived)) or self._control_bucket.allow())
        ):
            if self.state is State.OPEN:
                peer = self._slots.ip if self._slots is not None else ""
                log.info("websocket peer %s sends frames faster than its rate limit: closing it with 1008", peer)
                self.disconnect(Disconnect.RATE_LIMIT)
                cooldowns.penalise(peer, conf.get("OFFLOAD_ABUSE_COOLDOWN"))
            else:
                self.state = State.CLOSED  # still flooding after our close frame: drop it
            return False
        if isinstance(event, TextReceived):
            if self.state is State.OPEN:
                endpoint.on_text(event.text)
        elif isinstance(event, BinaryReceived):
            if self.state is State.OPEN:
                endpoint.on_binary(event.data)
        elif isinstance(event, PingReceived):
            self._write(self._reader.pong(event.payload))
        elif isinstance(event, (PongReceived, FragmentReceived)):
            pass  # counted above; any received byte already counts as a sign of life
        elif isinstance(event, CloseReceived):
            self.close_code = event.code
            self._write(self._reader.close(event.code))
            self.state = State.CLOSED
        elif isinstance(event, ProtocolFailure):
            # Send the close frame, then keep reading (and discarding) until the
            # client closes or the grace period ends: closing with its bytes
            # unread would make the kernel reset the connection and drop the
            # close frame before the client reads it. A FIN right after the
            # close frame tells the client at once that nothing else follows.
            self.close(event.code, event.reason)
            if not self._out:
                shutdown_write(self.fd)
        return self.state is not State.CLOSED

    def _timers(self) -> None:
        now = time.monotonic()
        if self.state is State.CLOSING and now - self._closing_since >= _CLOSE_GRACE:
            self.state = State.CLOSED
        elif self._stuck_since is not None and now - self._stuck_since >= self._ping_timeout:
            log.info("websocket peer stopped reading for %.0f s: dropping it", self._ping_timeout)
            self.state = State.CLOSED
        elif self._ping_sent is not None and now - self._ping_sent >= self._ping_timeout:
            log.info("websocket peer did not answer a ping for %.0f s: dropping it", self._ping_timeout)
            self.state = State.CLOSED  # a dead peer cannot receive a close frame
        elif self.state is State.OPEN and self._ping_sent is None and now >= self._next_ping:
            self._write(self._reader.ping(b"%d" % int(now * 1000)))
            self._ping_sent = now
            self._next_ping = now + self._ping_interval
            if self._slots is not None:
                self._slots.refresh()
