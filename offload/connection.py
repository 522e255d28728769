"""One websocket's life, on its own request greenlet (the uWSGI/gevent edge).

Theory of operation
-------------------
uWSGI performs the handshake (``uwsgi.websocket_handshake``) and sends data
messages (``uwsgi.websocket_send``/``_binary``); both must be called from the
request's own greenlet. Client frames are *not* read with uWSGI's unsafe
receive path: the greenlet reads raw bytes from ``uwsgi.connection_fd()`` and
feeds :class:`offload.frames.FrameReader` (wsproto). Control frames (pong,
ping, close) are written to the fd as bytes, from the same greenlet, so
frames never interleave.

The greenlet sleeps on one event, set by any of: the fd became readable
(a libev io watcher), another greenlet queued something (the hub delivering a
message), or the next timer. Each wake-up it drains everything: all readable
bytes, all parsed events, all queued messages.

Lifecycle::

    state     event                                   next
    --------  --------------------------------------  --------
    OPEN      peer close frame -> echo it             CLOSED
    OPEN      close(code) by us -> send close frame   CLOSING
    OPEN      protocol error -> close 1002/1007/1009  CLOSED
    OPEN      no pong/data within ping timeout        CLOSED (1011)
    OPEN      outgoing queue over the limit           CLOSING (1008)
    CLOSING   peer close frame, EOF or 2 s timeout    CLOSED
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import signal
import time
from collections import deque

import gevent
import gevent.event
import gevent.socket

from . import conf
from .frames import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_RESTART,
    BinaryReceived,
    CloseReceived,
    FrameReader,
    PingReceived,
    PongReceived,
    ProtocolFailure,
    TextReceived,
)
from .limits import ConnectionSlots, TokenBucket
from .policies import Identity

__all__ = ["Endpoint", "WebSocket", "close_all", "open_connections"]

log = logging.getLogger("offload.connection")

_CLOSE_GRACE = 2.0  # seconds to wait for the peer's close frame
_READ_SIZE = 65536
_open: set[WebSocket] = set()


def open_connections() -> int:
    """Websockets open in this process."""
    return len(_open)


def close_all(code: int = CLOSE_RESTART, reason: str = "server restart") -> None:
    """Ask every websocket of this process to close (e.g. on reload)."""
    for ws in list(_open):
        ws.close(code, reason)


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
        import uwsgi

        self._uwsgi = uwsgi
        self.fd = fd
        self.identity = identity
        self.query = query
        self.worker_id = worker_id
        self.state = State.OPEN
        self.close_code: int | None = None
        self._reader = FrameReader(conf.get("OFFLOAD_MAX_MESSAGE_BYTES"))
        self._outbox: deque[tuple[int, bytes | str]] = deque()
        self._max_queued = conf.get("OFFLOAD_MAX_QUEUED_MESSAGES")
        self._wake = gevent.event.Event()
        self._ping_interval = conf.get("OFFLOAD_PING_INTERVAL")
        self._ping_timeout = conf.get("OFFLOAD_PING_TIMEOUT")
        self._closing_since = 0.0
        self._pending_close: tuple[int, str] | None = None
        self._slots = slots
        self._bucket = TokenBucket(conf.get("OFFLOAD_MAX_MESSAGES_PER_SECOND"), conf.get("OFFLOAD_MESSAGE_BURST"))

    # -- API for endpoints and the hub (any greenlet) --------------------------

    def send_text(self, text: str) -> None:
        """Queue a text message; it is sent on the connection's greenlet."""
        self._queue(_TEXT, text)

    def send_binary(self, data: bytes) -> None:
        self._queue(_BINARY, data)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (from any greenlet)."""
        if self.state is State.OPEN and self._pending_close is None:
            self._pending_close = (code, reason)
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._outbox)

    def _queue(self, kind: int, payload: bytes | str) -> None:
        if self.state is not State.OPEN or self._pending_close is not None:
            return
        if len(self._outbox) >= self._max_queued:
            # The client does not read: drop its queue, never slow the others.
            self._outbox.clear()
            self.close(CLOSE_POLICY, "slow consumer")
            return
        self._outbox.append((kind, payload))
        self._wake.set()

    # -- the loop (the request greenlet only) ----------------------------------

    def run(self, endpoint: Endpoint) -> None:
        """Serve the websocket until it closes."""
        watcher = gevent.get_hub().loop.io(self.fd, 1)
        watcher.start(self._wake.set)
        _open.add(self)
        now = time.monotonic()
        self._last_heard = now
        self._next_ping = now + self._ping_interval
        self._ping_sent: float | None = None
        try:
            endpoint.on_open()
            while self.state is not State.CLOSED:
                self._flush()
                self._wake.wait(timeout=self._timeout(endpoint))
                self._wake.clear()
                self._read(endpoint)
                if self.state is State.OPEN:
                    endpoint.on_wake()
                self._timers()
        except OSError as exc:
            # The peer vanished mid-send (uWSGI raises IOError): nothing to close.
            log.debug("websocket I/O error: %s", exc)
        except Exception:
            log.exception("websocket endpoint failed")
            self._send_close(CLOSE_INTERNAL, "internal error")
        finally:
            watcher.stop()
            _open.discard(self)
            if self._slots is not None:
                self._slots.release()
            self.state = State.CLOSED
            self._outbox.clear()
            try:
                endpoint.on_close()
            except Exception:
                log.exception("websocket on_close failed")

    def _timeout(self, endpoint: Endpoint) -> float:
        if self._ping_sent is not None:  # one ping at a time: wait for its answer
            deadline = self._ping_sent + self._ping_timeout
        else:
            deadline = self._next_ping
        if self.state is State.CLOSING:
            deadline = min(deadline, self._closing_since + _CLOSE_GRACE)
        extra = endpoint.next_deadline()
        if extra is not None:
            deadline = min(deadline, extra)
        return max(0.0, deadline - time.monotonic())

    def _read(self, endpoint: Endpoint) -> None:
        while self.state is not State.CLOSED:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                data = b""
            self._last_heard = time.monotonic()
            self._ping_sent = None
            for event in self._reader.feed(data or None):
                self._handle(event, endpoint)
                if self.state is State.CLOSED:
                    return
            if not data:
                self.state = State.CLOSED
                return

    def _handle(self, event, endpoint: Endpoint) -> None:
        if isinstance(event, (TextReceived, BinaryReceived)) and not self._bucket.allow():
            self._send_close(CLOSE_POLICY, "rate limit exceeded")
            return
        if isinstance(event, TextReceived):
            if self.state is State.OPEN:
                endpoint.on_text(event.text)
        elif isinstance(event, BinaryReceived):
            if self.state is State.OPEN:
                endpoint.on_binary(event.data)
        elif isinstance(event, PingReceived):
            self._write_raw(self._reader.pong(event.payload))
        elif isinstance(event, PongReceived):
            pass  # any received byte already counts as a sign of life
        elif isinstance(event, CloseReceived):
            self.close_code = event.code
            self._write_raw(self._reader.close(event.code))
            self.state = State.CLOSED
        elif isinstance(event, ProtocolFailure):
            self._send_close(event.code, event.reason)
            self.state = State.CLOSED

    def _timers(self) -> None:
        now = time.monotonic()
        if self.state is State.CLOSING and now - self._closing_since >= _CLOSE_GRACE:
            self.state = State.CLOSED
        elif self._ping_sent is not None and now - self._ping_sent >= self._ping_timeout:
            log.info("websocket peer did not answer a ping for %.0f s: dropping it", self._ping_timeout)
            self.state = State.CLOSED  # a dead peer cannot receive a close frame
        elif self.state is State.OPEN and self._ping_sent is None and now >= self._next_ping:
            self._write_raw(self._reader.ping(b"%d" % int(now * 1000)))
            self._ping_sent = now
            self._next_ping = now + self._ping_interval
            if self._slots is not None:
                self._slots.refresh()

    def _flush(self) -> None:
        if self._pending_close is not None and self.state is State.OPEN:
            code, reason = self._pending_close
            self._outbox.clear()
            self._send_close(code, reason)
            return
        if not self._outbox:
            return
        send_text = self._uwsgi.websocket_send
        send_binary = self._uwsgi.websocket_send_binary
        outbox = self._outbox
        # A client that stops reading blocks the send; bound it.
        with gevent.Timeout(self._ping_timeout, OSError("send timed out")):
            while outbox and self.state is State.OPEN:
                kind, payload = outbox.popleft()
                if kind is _TEXT:
                    send_text(payload)
                else:
                    send_binary(payload)

    def _send_close(self, code: int, reason: str) -> None:
        self.close_code = code
        self._write_raw(self._reader.close(code, reason))
        if self.state is State.OPEN:
            self.state = State.CLOSING
            self._closing_since = time.monotonic()

    def _write_raw(self, data: bytes) -> None:
        """Write control-frame bytes completely (same greenlet as data sends)."""
        view = memoryview(data)
        deadline = time.monotonic() + _CLOSE_GRACE
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError("control frame write timed out") from None
                gevent.socket.wait_write(self.fd, timeout=left)
                continue
            view = view[written:]


_TEXT = 0
_BINARY = 1

_handlers_installed_pid: int | None = None


def install_reload_handler() -> None:
    """On graceful reload (SIGHUP to the worker), close every socket with 1012.

    uWSGI's gevent loop waits for every open request before a worker can be
    replaced; closing websockets promptly makes reloads take seconds instead
    of ``worker-reload-mercy``, and 1012 tells clients to reconnect and resume.
    """
    global _handlers_installed_pid
    if _handlers_installed_pid == os.getpid():
        return
    _handlers_installed_pid = os.getpid()
    gevent.signal_handler(signal.SIGHUP, close_all)
