"""One websocket's I/O on libev watchers, with a greenlet only while it has work (the uWSGI/gevent edge).

Theory of operation
-------------------
uWSGI performs the handshake (``uwsgi.websocket_handshake``, on the request's
own greenlet). From then on the connection owns the client's fd (a duplicate
once it left the request: :func:`offload.transports.sockets.detach`). The protocol's
rules, states and timers live in
:class:`offload.core.websocket_protocol.WebSocketProtocol` (sans-I/O, its
transition table and tests need no socket and no clock); this module is the
thin loop around it:

* Reading: raw bytes from the fd go to the protocol (never to uWSGI's unsafe
  receive path); the messages it yields go to the endpoint. One wake-up reads
  at most ``_READS_PER_WAKE`` chunks, so a flooding socket cannot keep the
  worker's other sockets waiting.
* Writing: every frame (data, and the protocol's control frames) goes through
  :meth:`WebSocket.send_frame`, callable from any greenlet. When nothing is
  pending it is one non-blocking ``os.write`` of complete frame bytes, done
  by the caller: the hub writes a message it framed once to every socket
  without waking their greenlets (:meth:`WebSocket.offer`). Whatever the
  kernel does not take is queued and flushed by a write watcher when the
  socket drains; a socket whose queue would grow past
  ``OFFLOAD_MAX_QUEUED_BYTES`` is a slow consumer and is closed (1008). One
  writer at a time (gevent is cooperative and a write never yields), so
  frames never interleave.

An idle socket has no greenlet: a parked greenlet keeps its saved C stack
and Python frame chunk (about 5.5 KB, more than the rest of the socket).
It waits on a read watcher and one timer (the next deadline of the protocol
or the endpoint). A *turn* (read what arrived, ``on_wake``, the protocol's
timers) runs on a greenlet spawned when one of them fires or when
:meth:`WebSocket.wake` is called (the queue drained, a close was requested,
the session has work); it takes more turns while woken meanwhile, then parks
the socket again and ends. One turn at a time per socket, so the endpoint
still sees one caller, which may block on Redis. The clock is injected
(``clock``).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable

import gevent

from .. import conf, metrics
from ..backend.abuse import penalise
from ..backend.slots import ConnectionSlots
from ..core.closes import Disconnect
from ..core.frames import (
    BinaryReceived,
    FrameReader,
    TextReceived,
    frame_binary,
    frame_text,
)
from ..core.rates import TokenBucket
from ..core.websocket_protocol import Dropped, RateLimited, State, WebSocketProtocol
from ..logs import connection_fields, log_connection
from ..policies import Identity
from .lifecycle import new_connection_id
from .sockets import close_now, cork, detach, shutdown_write

__all__ = ["Endpoint", "State", "WebSocket", "close_all", "close_user", "open_connections", "queued_bytes"]


log = logging.getLogger("offload.transports.connection")

_READ_SIZE = 65536
_READS_PER_WAKE = 16  # chunks read per wake-up before the other greenlets get a turn
_open: set[WebSocket] = set()


def open_connections() -> int:
    """Websockets open in this process."""
    return len(_open)


def queued_bytes() -> int:
    """Bytes queued for this process's websockets (the metrics sampler reads it)."""
    return sum(ws.queued_bytes for ws in _open)


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


class Endpoint:
    """What runs on a websocket. Subclass and override the ``on_*`` hooks.

    All hooks run in the connection's turns, on a greenlet it borrows (one
    turn at a time), so they may call ``self.ws.send_text()`` and block on
    Redis (gevent-cooperatively).
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
    """An upgraded connection: the protocol, the outgoing queue, the loop."""

    __slots__ = (
        "_busy",
        "_clock",
        "_corked",
        "_endpoint",
        "_max_queued",
        "_out",
        "_owns_fd",
        "_queued_bytes",
        "_reader",
        "_slots",
        "_stuck_since",
        "_timer",
        "_woken",
        "_write_watcher",
        "connection_id",
        "fd",
        "identity",
        "protocol",
        "query",
        "worker_id",
    )

    def __init__(
        self,
        fd: int,
        identity: Identity,
        query: dict[str, list[str]],
        worker_id: int = 0,
        slots: ConnectionSlots | None = None,
        clock: Callable[[], float] = time.monotonic,
        corked: bool = False,
        connection_id: str | None = None,
    ) -> None:
        self.fd = fd
        #: the view corked the socket (:func:`offload.transports.sockets.cork`): the first write releases it,
        #: or the first turn's end if it wrote nothing
        self._corked = corked
        self.identity = identity
        #: random hex, unique per connection (lifecycle signals, logs; its slot's member id)
        self.connection_id = connection_id or new_connection_id()
        self.query = query
        self.worker_id = worker_id
        self._clock = clock
        interval = conf.get("OFFLOAD_PING_INTERVAL")
        self.protocol = WebSocketProtocol(
            FrameReader(conf.get("OFFLOAD_MAX_MESSAGE_BYTES")),
            (
                TokenBucket(conf.get("OFFLOAD_MAX_MESSAGES_PER_SECOND"), conf.get("OFFLOAD_MESSAGE_BURST"), clock),
                TokenBucket(
                    conf.get("OFFLOAD_MAX_CONTROL_FRAMES_PER_SECOND"), conf.get("OFFLOAD_CONTROL_FRAME_BURST"), clock
                ),
            ),
            ping_interval=interval,
            ping_timeout=conf.get("OFFLOAD_PING_TIMEOUT"),
            now=clock(),
            # Sockets that connected together (a storm, a reload) do not all ping together.
            first_ping_in=interval * random.uniform(0.5, 1.0),
        )
        # Made when first needed, and dropped when no longer: most sockets never need them.
        self._out: deque[bytes | memoryview] | None = None
        self._write_watcher = None  # flushes the queue when the socket drains
        self._queued_bytes = 0
        self._max_queued = conf.get("OFFLOAD_MAX_QUEUED_BYTES")
        self._stuck_since: float | None = None
        self._slots = slots
        self._owns_fd = False
        # The turns (see the module's docstring). Busy until run() parks the
        # socket, and again for good once it ended: wake() then only notes it.
        self._endpoint: Endpoint | None = None
        self._reader = None  # read watcher, started while parked
        self._timer = None  # the next deadline, while parked
        self._busy = True
        self._woken = False

    @property
    def state(self) -> State:
        return self.protocol.state

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

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
        if self.protocol.state or self._out:  # State.OPEN is 0
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
        if self.protocol.state is State.OPEN:
            self._write(frame)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (from any greenlet)."""
        if self.protocol.state is State.OPEN:
            self.protocol.close(code, reason, self._clock())
            self._flush_protocol()
            self.wake()

    def disconnect(self, why: Disconnect) -> None:
        """Close with the code and reason of ``why`` (from any greenlet)."""
        if self.protocol.state is State.OPEN:
            metrics.connection_closed("websocket", why.name.lower(), self.identity.user_id)
        self.close(why.code, why.reason)

    def wake(self) -> None:
        """Have a turn run soon (from any greenlet, or a watcher's callback):
        on a greenlet spawned now if the socket is parked, else the turn
        under way takes another one."""
        if self._busy:
            self._woken = True
            return
        self._busy = self._woken = True
        self._reader.stop()
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        gevent.spawn(self._serve, self._endpoint)

    @property
    def queued(self) -> int:
        """Frames (or parts of one) waiting for the socket to drain."""
        return len(self._out) if self._out else 0

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the socket to drain (bounded by ``OFFLOAD_MAX_QUEUED_BYTES``).

        When it falls back to 0 the connection is woken (a turn), so an
        endpoint that waits for the client to read (a history replay sent
        page by page) can go on.
        """
        return self._queued_bytes

    # -- writing ------------------------------------------------------------------

    def _flush_protocol(self) -> None:
        """Write the protocol's control frames (pongs, pings, close frames), then its FIN if due."""
        for data in self.protocol.data_to_send():
            self._write(data)
        if self.protocol.send_fin and not self._out:
            self.protocol.send_fin = False
            shutdown_write(self.fd)

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
            if self._corked:  # the 101 and this first frame leave in one segment
                self._uncork()
            return
        if self._queued_bytes + len(data) > self._max_queued and self.protocol.state is State.OPEN:
            # The client does not read. Keep the frame being written (it may
            # be half sent), drop the rest, never slow the others down.
            head = out.popleft()
            out.clear()
            out.append(head)
            self._queued_bytes = len(head)
            log.info(
                "websocket peer is a slow consumer (over %d bytes queued): closing it with 1008",
                self._max_queued,
                extra=connection_fields(self),
            )
            self.disconnect(Disconnect.SLOW_CONSUMER)
            return
        out.append(data)
        self._queued_bytes += len(data)

    def _queue_unsent(self, data: bytes | memoryview, written: int) -> None:
        """The kernel took ``written`` bytes of ``data`` (the queue being empty):
        keep the rest and flush it when the socket drains."""
        rest = memoryview(data)[written:]
        self._out = deque((rest,))
        self._queued_bytes += len(rest)
        self._stuck_since = self._clock()
        if self._write_watcher is None:
            self._write_watcher = gevent.get_hub().loop.io(self.fd, 2)
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
                    self._stuck_since = self._clock()
                    return
                out.popleft()
        except BlockingIOError:
            return
        except OSError:
            self._broken()
            return
        self._stuck_since = None
        self._drop_queue()
        self.wake()  # drained: an endpoint waiting to send more (history pages) goes on

    def _drop_queue(self) -> None:
        """Forget the queue and its write watcher (drained, or nobody to send to)."""
        self._out = None
        self._queued_bytes = 0
        if self._write_watcher is not None:
            self._write_watcher.stop()
            self._write_watcher = None

    def _broken(self) -> None:
        """The peer is gone (EPIPE, ECONNRESET): stop at once."""
        self._drop_queue()
        self.protocol.connection_lost()
        self.wake()

    def detach(self) -> None:
        """Take the socket over from uWSGI, freeing the request's async core
        (:func:`offload.transports.sockets.detach`). Call it before any data is exchanged."""
        self.fd = detach(self.fd)
        self._owns_fd = True

    # -- the loop ----------------------------------------------------------------

    def run(self, endpoint: Endpoint) -> None:
        """Serve the websocket: ``endpoint.on_open()`` and the first turns on
        the calling greenlet, which is free again once the socket parks (see
        the module's docstring); later turns run on greenlets of their own."""
        self._endpoint = endpoint
        self._reader = gevent.get_hub().loop.io(self.fd, 1)
        _open.add(self)
        metrics.connection_opened("websocket")
        log_connection(log, logging.DEBUG, self, "websocket open")
        self._serve(endpoint, opening=True)

    def _serve(self, endpoint: Endpoint, opening: bool = False) -> None:
        """Turns while woken; then park the socket, or end it once closed."""
        ended = True
        # The opening turn reads nothing: what a client sent right after the 101 wakes the
        # parked socket at once (a read here found nothing in a storm, at a system call each).
        read = not opening
        try:
            if opening:
                endpoint.on_open()
            while self.protocol.state is not State.CLOSED:
                if not self._woken:
                    self._park(endpoint)
                    ended = False
                    return
                self._woken = False
                if read:
                    self._read(endpoint)
                read = True
                if self.protocol.state is State.OPEN:
                    endpoint.on_wake()
                self._tick()
        except Exception:
            log.exception("websocket endpoint failed", extra=connection_fields(self))
            self.disconnect(Disconnect.INTERNAL_ERROR)
        finally:
            if ended:
                self._end(endpoint)

    def _park(self, endpoint: Endpoint) -> None:
        """Wait for the next turn on watchers alone: data to read, or the next deadline."""
        if self._corked:  # the first turn wrote nothing (no channel yet, or one still subscribing): the 101 goes now
            self._uncork()
        delay = self._timeout(endpoint)
        self._timer = timer = gevent.get_hub().loop.timer(delay)
        timer.start(self.wake)
        self._reader.start(self.wake)
        self._busy = False

    def _uncork(self) -> None:
        self._corked = False
        cork(self.fd, False)

    def _end(self, endpoint: Endpoint) -> None:
        """The connection is over: release everything, tell the endpoint, close the fd."""
        self._busy = True  # for good: no more turns
        self._reader.stop()
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        _open.discard(self)
        if self._slots is not None:
            self._slots.release()
        self.protocol.connection_lost()
        self._drop_queue()
        try:
            endpoint.on_close()
        except Exception:
            log.exception("websocket on_close failed", extra=connection_fields(self))
        if self._owns_fd:
            close_now(self.fd)
        log_connection(log, logging.DEBUG, self, "websocket closed (code %s)", self.protocol.close_code)

    def _timeout(self, endpoint: Endpoint) -> float:
        deadline = self.protocol.next_deadline(self._stuck_since)
        extra = endpoint.next_deadline()
        if extra is not None:
            deadline = min(deadline, extra)
        return max(0.0, deadline - self._clock())

    def _read(self, endpoint: Endpoint) -> None:
        protocol = self.protocol
        for _ in range(_READS_PER_WAKE):
            if protocol.state is State.CLOSED:
                return
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                data = b""
            was_open = protocol.state is State.OPEN
            for event in protocol.receive(data or None, self._clock()):
                if isinstance(event, RateLimited):  # logged before the close frame leaves
                    peer = self._slots.ip if self._slots is not None else ""
                    log.info(
                        "websocket peer %s sends frames faster than its rate limit: closing it with 1008",
                        peer,
                        extra=connection_fields(self),
                    )
                    penalise(peer, conf.get("OFFLOAD_ABUSE_COOLDOWN"))
                    metrics.connection_closed("websocket", "rate_limit", self.identity.user_id)
                self._flush_protocol()  # pongs before what the endpoint answers next
                if isinstance(event, TextReceived):
                    endpoint.on_text(event.text)
                elif isinstance(event, BinaryReceived):
                    endpoint.on_binary(event.data)
            if was_open and protocol.send_fin:  # only a protocol error (1002/1007/1009) closes with a FIN
                metrics.connection_closed("websocket", "protocol_error", self.identity.user_id)
            self._flush_protocol()
            if not data:
                return
        # More is readable (the io watcher fires again): the other sockets first.

    def _tick(self) -> None:
        result = self.protocol.tick(self._clock(), self._stuck_since)
        if isinstance(result, Dropped):
            metrics.connection_closed("websocket", "dead_peer", self.identity.user_id)
            log.info("%s", result.why, extra=connection_fields(self))
        elif result:  # a ping went out: this socket is alive, keep counting it
            self._flush_protocol()
            if self._slots is not None:
                self._slots.refresh()
