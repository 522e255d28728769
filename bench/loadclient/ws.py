"""Websocket subscribers on picows: thousands per process, one callback per message.

picows parses frames in C and calls ``on_ws_frame`` directly (no task, no
queue per message), so one client process can take 100,000+ messages/s and
stamp each at arrival. A subscriber is ready once the server's
``{"type": "subscribed"}`` reply arrived; the data of every later
``message`` goes, unparsed, to the pool's ``on_data(index, data, received_ns)``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections import Counter
from collections.abc import Callable

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

#: tries per websocket: a handshake that stalls (a SYN dropped by a full
#: accept queue waits for TCP's retransmission) is retried rather than fatal
ATTEMPTS = 4
#: uvloop's own transport, not aiofastnet's (picows' default when installed): aiofastnet connects in Python, and a
#: 10,000-socket storm cost the clients 25 % more CPU (alternating storms: 3.09-3.44 s against 2.47-2.66 s), CPU
#: the server under test shares; receiving at 300,000 deliveries/s cost them about the same (112 % and 118 % of a core)
TRANSPORT = {"use_aiofastnet": False}


class Subscriber(WSListener):
    def __init__(self, pool: SubscriberPool, index: int) -> None:
        super().__init__()
        self.pool, self.index = pool, index
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None
        self.close_code: int | None = None
        self._parts: list[bytes] = []
        self.abandoned = False

    def abandon(self) -> None:
        """A retried attempt: its connection must not stay open (nor deliver), even if it completes later."""
        self.abandoned = True
        if self.transport is not None:
            self.transport.disconnect()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.abandoned:  # the handshake completed after the attempt was given up (ws_connect cancelled)
            transport.disconnect()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        received = time.time_ns()
        if self.abandoned:
            return
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = getattr(frame.get_close_code(), "value", frame.get_close_code())
            return
        if frame.msg_type not in (WSMsgType.TEXT, WSMsgType.CONTINUATION):
            return  # pings are answered by picows itself
        self._parts.append(frame.get_payload_as_bytes())
        if not frame.fin:
            return
        payload, self._parts = b"".join(self._parts), []
        if not payload.startswith(b"{") and not (payload := self.engine_io(transport, payload)):
            return
        # the server splices the data JSON last into a fixed envelope (offload.core.cursor.make_entry): hand it
        # over unparsed, a json.loads per delivery would delay the next sockets
        at = payload.find(b',"data":') if payload.startswith(b'{"type":"message"') else -1
        if at > 0:
            self.pool.on_data(self.index, payload[at + 8 : -1], received)
            return
        message = json.loads(payload)
        if message.get("type") == "subscribed" and not self.ready.done():
            self.ready.set_result(True)
        elif message.get("type") == "error":
            self.pool.errors[message.get("code", "?")] += 1
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"subscribe refused: {message}"))

    @staticmethod
    def engine_io(transport: WSTransport, payload: bytes) -> bytes | None:
        """Socket.IO 4 (the Node.js anchor): an event ``42["message",X]`` gives ``X``; the Engine.IO open
        packet is answered by joining the default namespace (``40``), a ping by a pong; the rest is dropped."""
        if payload.startswith(b"42["):
            return payload[payload.find(b",") + 1 : -1]
        if payload[:1] in (b"0", b"2"):
            transport.send(WSMsgType.TEXT, b"40" if payload[:1] == b"0" else b"3")
        return None

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.abandoned:
            return
        if not self.pool.closing:
            self.pool.disconnects.append((time.time_ns(), self.index, self.close_code))
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before subscribed"))


class SubscriberPool:
    """``n`` websockets, connected with bounded concurrency; ``url(index)`` gives each its URL (one host)."""

    def __init__(self, url: Callable[[int], str], n: int, on_data: Callable, headers: dict | None = None) -> None:
        self.url, self.n, self.on_data = url, n, on_data
        self.headers = {"Origin": "http://" + url(0).split("://", 1)[1].split("/", 1)[0], **(headers or {})}
        self.subscribers: list[Subscriber] = []
        self.errors: Counter[str] = Counter()
        self.disconnects: list[tuple[int, int, int | None]] = []  # (time_ns, index, close code)
        self.connect_us: list[int] = []  # each socket's first try to its "subscribed", retries included
        self.closing = False

    async def _connect_one(self, index: int, gate: asyncio.Semaphore, timeout: float) -> Subscriber:
        async with gate:
            started = time.perf_counter_ns()
            for attempt in range(ATTEMPTS):
                sub = Subscriber(self, index)
                try:
                    async with asyncio.timeout(timeout):
                        how = {"extra_headers": self.headers, "websocket_handshake_timeout": timeout, **TRANSPORT}
                        await ws_connect(lambda sub=sub: sub, self.url(index), **how)
                        await sub.ready
                        self.connect_us.append((time.perf_counter_ns() - started) // 1000)
                        return sub
                except Exception as exc:  # picows' WSError (e.g. 429), timeouts, resets
                    self.errors[f"connect: {type(exc).__name__}"] += 1
                    sub.abandon()
                    if attempt == ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def connect(self, concurrency: int = 50, timeout: float = 5.0) -> float:
        """Connect and subscribe all; returns the seconds taken. Fails if any fails."""
        started, gate = time.monotonic(), asyncio.Semaphore(concurrency)
        # Thousands of tasks and sockets at once made Python's cyclic collector run full collections over all of
        # them: a 10,000-socket storm spent its first second in gc on both CPUs, starving the server under test.
        # What the subscribers keep lives until the end: frozen, later collections never walk it.
        gc.disable()
        try:
            self.subscribers = list(await asyncio.gather(*(self._connect_one(i, gate, timeout) for i in range(self.n))))
        finally:
            gc.freeze()
            gc.enable()
        return time.monotonic() - started

    async def close(self) -> None:
        self.closing = True
        open_ = [s.transport for s in self.subscribers if s.transport is not None and not s.transport.is_disconnected]
        for transport in open_:
            transport.disconnect()
        try:
            async with asyncio.timeout(5):
                await asyncio.gather(*(t.wait_disconnected() for t in open_))
        except TimeoutError:
            print("some websockets did not close within 5 s", file=sys.stderr)

    def open_count(self) -> int:
        return sum(1 for s in self.subscribers if s.transport is not None and not s.transport.is_disconnected)
