"""Websocket subscribers on picows: thousands per process, one callback per message.

picows parses frames in C and calls ``on_ws_frame`` directly (no task, no
queue per message), so one client process can take 10,000+ messages/s and
stamp each at arrival. A subscriber is ready once the server's
``{"type": "subscribed"}`` reply arrived; every later ``message`` is handed
to the pool's ``on_data(index, data, received_ns)`` callback.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

#: tries per websocket: a handshake that stalls (a SYN dropped by a full
#: accept queue waits for TCP's retransmission) is retried rather than fatal
ATTEMPTS = 4


class Subscriber(WSListener):
    def __init__(self, pool: SubscriberPool, index: int) -> None:
        super().__init__()
        self.pool = pool
        self.index = index
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None
        self.close_code: int | None = None
        self._parts: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        received = time.time_ns()
        kind = frame.msg_type
        if kind == WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = getattr(code, "value", code)
            return
        if kind not in (WSMsgType.TEXT, WSMsgType.CONTINUATION):
            return  # pings are answered by picows itself
        if not frame.fin or self._parts:
            self._parts.append(frame.get_payload_as_bytes())
            if not frame.fin:
                return
            payload, self._parts = b"".join(self._parts), []
        else:
            payload = frame.get_payload_as_bytes()
        if self.pool.raw and payload.startswith(b'{"type":"message"'):
            # the server splices data JSON last into a fixed envelope (offload.cursor.make_entry):
            # hand the data over unparsed, json.loads per delivery would delay the next sockets
            at = payload.find(b',"data":')
            if at > 0:
                self.pool.on_data(self.index, payload[at + 8 : -1], received)
                return
        message = json.loads(payload)
        kind = message.get("type")
        if kind == "message":
            data = message["data"]
            self.pool.on_data(self.index, json.dumps(data).encode() if self.pool.raw else data, received)
        elif kind == "subscribed":
            if not self.ready.done():
                self.ready.set_result(True)
        elif kind == "error":
            self.pool.errors[message.get("code", "?")] += 1
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"subscribe refused: {message}"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.pool.on_disconnect(self)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before subscribed"))


class SubscriberPool:
    """``n`` websockets, connected with bounded concurrency.

    Args:
        url: ``ws://127.0.0.1:PORT/ws/?channel=...`` for all of them, or a
            function of the subscriber's index giving its own URL (e.g. one
            channel per index); every URL must name the same host.
        on_data: called for every ``message`` with (index, data, received_ns).
        headers: extra handshake headers (Origin is set from the URL).
        raw: pass ``data`` as its JSON bytes, unparsed (cheaper per delivery).
    """

    def __init__(
        self,
        url: str | Callable[[int], str],
        n: int,
        on_data: Callable[[int, object, int], None],
        headers: dict | None = None,
        raw: bool = False,
    ):
        self.url = url
        self.url_for: Callable[[int], str] = url if callable(url) else (lambda _index: url)
        self.raw = raw
        self.n = n
        self.on_data = on_data
        origin = "http://" + self.url_for(0).split("://", 1)[1].split("/", 1)[0]
        self.headers = {"Origin": origin, **(headers or {})}
        self.subscribers: list[Subscriber] = []
        self.errors: Counter[str] = Counter()
        self.disconnects: list[tuple[int, int, int | None]] = []  # (time_ns, index, close code)
        self.closing = False

    def on_disconnect(self, sub: Subscriber) -> None:
        if not self.closing:
            self.disconnects.append((time.time_ns(), sub.index, sub.close_code))

    async def _connect_one(self, index: int, gate: asyncio.Semaphore, timeout: float) -> Subscriber:
        url = self.url_for(index)
        async with gate:
            for attempt in range(ATTEMPTS):
                sub = None
                try:
                    async with asyncio.timeout(timeout):
                        _, sub = await ws_connect(
                            lambda: Subscriber(self, index),
                            url,
                            extra_headers=self.headers,
                            websocket_handshake_timeout=timeout,
                        )
                        await sub.ready
                        return sub
                except Exception as exc:  # picows' WSError (e.g. 429), timeouts, resets
                    self.errors[f"connect: {type(exc).__name__}"] += 1
                    if sub is not None and sub.transport is not None:  # an abandoned attempt must not deliver
                        sub.transport.disconnect()
                    if attempt == ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def connect(self, concurrency: int = 50, timeout: float = 5.0) -> float:
        """Connect and subscribe all; returns seconds taken. Fails if any fails."""
        started = time.monotonic()
        gate = asyncio.Semaphore(concurrency)
        self.subscribers = list(await asyncio.gather(*(self._connect_one(i, gate, timeout) for i in range(self.n))))
        return time.monotonic() - started

    async def close(self) -> None:
        self.closing = True
        for sub in self.subscribers:
            if sub.transport is not None and not sub.transport.is_disconnected:
                sub.transport.disconnect()
        try:
            async with asyncio.timeout(5):
                await asyncio.gather(
                    *(s.transport.wait_disconnected() for s in self.subscribers if s.transport is not None)
                )
        except TimeoutError:
            print("some websockets did not close within 5 s", file=sys.stderr)

    def open_count(self) -> int:
        return sum(1 for s in self.subscribers if s.transport is not None and not s.transport.is_disconnected)
