"""Slow consumers: fast subscribers with big messages, and subscribers that never read.

Two roles (separate processes, so that watching the stalled sockets never
delays the fast ones' timestamps):

``backpressure`` (the fast side): ``subscribers`` picows websockets on one
channel, and the publisher: ``{"cmd": "window", "name", "seconds", "rate"}``
POSTs ``rate`` messages/s through the HTTP API (open loop), each body
``{"t": ns, "seq": n, "p": "xxx..."}`` padded to ``payload`` bytes, and
measures every delivery to the fast sockets (latency = arrival - ``t``),
lost/duplicate per subscriber, publish API latency, its own loop lag and a
per-second p50/p99 timeline. ``{"cmd": "stop"}`` reports every window.

``stalled``: ``{"cmd": "stall", "name", "count", "returning"}`` opens
``count`` raw websockets with a small ``SO_RCVBUF`` on the same channel,
reads until the server's ``subscribed`` reply and then stops reading. Every
``poll_s`` it asks the kernel (sock_diag, same host) about the *server's*
end of each connection: how many bytes the server's kernel holds for it and
when it leaves ESTABLISHED, i.e. when the server closed its socket, which a
client that does not read cannot see. A witness socket on the same channel
reads normally and counts messages. The first ``returning`` sockets read
again ``resume_after`` messages after the server's kernel buffer for them
stopped growing (once the server's queue limit must have been reached, inside
its 2 s closing grace): they show which close frame the server queued. The
others read only after the server closed its end, to show how a client that
never came back sees its stream end. ``{"cmd": "release"}`` reports each
socket (``released``) and closes them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import sys
import time
from collections import Counter

from bench.stats import summarize_us

from . import http
from .channel import Channel
from .measure import Ledger, LoopLag, Series, Ticker, Window
from .probe import CDF_POINTS
from .ws import SubscriberPool

TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


# -- the padded stamp ---------------------------------------------------------


def padded_stamp(seq: int, payload: int) -> bytes:
    """``{"t":NS,"seq":N,"p":"xx..."}`` of ``payload`` bytes (``t`` and ``seq`` first)."""
    head = b'{"t":%d,"seq":%d,"p":"' % (time.time_ns(), seq)
    return head + b"x" * max(0, payload - len(head) - 2) + b'"}'


def parse_padded(raw: bytes) -> tuple[int, int]:
    """``(t, seq)`` of a padded stamp, reading only its first bytes."""
    comma = raw.find(b',"seq":', 0, 64)
    end = raw.find(b",", comma + 7, comma + 40)
    return int(raw[5:comma]), int(raw[comma + 7 : end])


def _timeline(series: Series, window: Window) -> list[list[float]]:
    out = []
    for offset, values in series.timeline(window):
        s = summarize_us(values)
        out.append([offset, s["p50"], s["p99"], s["n"]])
    return out


# -- fast side ---------------------------------------------------------------


async def run(cfg: dict, chan: Channel) -> None:
    host, port, n, payload = cfg["host"], cfg["port"], cfg["subscribers"], int(cfg["payload"])
    ledger = Ledger(n)
    latency = Series()

    def on_data(index: int, raw: bytes, received_ns: int) -> None:
        t, seq = parse_padded(raw)
        ledger.record(index, seq)
        latency.add(t, (received_ns - t) // 1000)

    pool = SubscriberPool(f"ws://{host}:{port}/ws/?channel={cfg['channel']}", n, on_data, raw=True)
    connect_s = await pool.connect(cfg["connect_concurrency"])
    chan.emit("ready", subscribers=n, connect_s=round(connect_s, 3), connect_errors=dict(pool.errors))

    published: dict[int, tuple[int, int | str]] = {}  # seq -> (t, status or error)
    publish_series = Series()
    headers = {"Authorization": f"Bearer {cfg['api_key']}", "Content-Type": "application/json"}
    seqs = iter(range(10**9))

    async def publish(_started_ns: int) -> None:
        seq = next(seqs)
        body = padded_stamp(seq, payload)
        t, _ = parse_padded(body)
        try:
            resp = await http.request(host, port, "POST", f"/api/publish/{cfg['channel']}", headers=headers, body=body)
            published[seq] = (t, resp.status)
            publish_series.add(t, resp.elapsed_ns // 1000)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            published[seq] = (t, type(exc).__name__)

    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run())
    windows: list[tuple[Window, dict]] = []
    while True:
        cmd = await chan.next()
        if cmd["cmd"] == "window":
            window = Window(cmd["name"], time.time_ns())
            ticker = Ticker(1 / float(cmd["rate"]), publish)
            task = asyncio.create_task(ticker.run())
            chan.emit("window_started", name=window.name, start_ns=window.start_ns)
            await asyncio.sleep(float(cmd["seconds"]))
            window.end_ns = time.time_ns()
            await ticker.drain(timeout=5)
            await asyncio.gather(task, return_exceptions=True)
            windows.append((window, cmd))
            chan.emit("window_ended", name=window.name, open_sockets=pool.open_count())
        elif cmd["cmd"] in ("stop", "eof"):
            break

    await asyncio.sleep(float(cfg.get("drain_s", 2.0)))  # deliveries of the last publishes
    lag.running = False
    lag_task.cancel()

    results = {}
    for w, cmd in windows:
        seconds = (w.end_ns - w.start_ns) / 1e9
        in_window = [(seq, status) for seq, (t, status) in published.items() if w.holds(t)]
        ok = [seq for seq, status in in_window if status == 200]
        values = latency.within(w)
        b = summarize_us(values, CDF_POINTS)
        b.update(ledger.tally(ok))
        b["deliveries_per_s"] = round(len(values) / seconds, 1)
        b["publishes_ok"] = len(ok)
        b["timeline"] = _timeline(latency, w)
        p = summarize_us(publish_series.within(w))
        p["failed"] = dict(Counter(str(status) for _, status in in_window if status != 200))
        closes = [code for t, _, code in pool.disconnects if w.holds(t)]
        results[w.name] = {
            "seconds": round(seconds, 2),
            "start_ns": w.start_ns,
            "end_ns": w.end_ns,
            "rate": cmd["rate"],
            "broadcast": b,
            "publish": p,
            "client_loop_lag": summarize_us(lag.series.within(w)),
            "disconnects": {"count": len(closes), "codes": dict(Counter(str(c) for c in closes))},
        }
    chan.emit("summary", windows=results, subscribe_errors=dict(pool.errors), disconnects=len(pool.disconnects))
    await pool.close()


# -- stalled side --------------------------------------------------------------


class FrameScanner:
    """Walks server frames (unmasked) in a byte stream, keeping only what it needs."""

    def __init__(self) -> None:
        self.buffer = b""
        self.frames = 0
        self.messages = 0  # text frames
        self.texts: list[bytes] = []  # the first few text payloads (the subscribed reply)
        self.close_code: int | None = None
        self.close_reason = ""

    def feed(self, data: bytes) -> None:
        buf = self.buffer + data
        at = 0
        while len(buf) - at >= 2:
            b0, b1 = buf[at], buf[at + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if len(buf) - at < 4:
                    break
                n, head = struct.unpack_from("!H", buf, at + 2)[0], 4
            elif n == 127:
                if len(buf) - at < 10:
                    break
                n, head = struct.unpack_from("!Q", buf, at + 2)[0], 10
            if len(buf) - at < head + n:
                break
            opcode = b0 & 0x0F
            self.frames += 1
            if opcode == 1:
                self.messages += 1
                if len(self.texts) < 4:
                    self.texts.append(buf[at + head : at + head + n])
            elif opcode == 8 and self.close_code is None:
                payload = buf[at + head : at + head + n]
                self.close_code = struct.unpack("!H", payload[:2])[0] if n >= 2 else 1005
                self.close_reason = payload[2:].decode(errors="replace")
            at += head + n
        self.buffer = buf[at:]


class Stalled:
    """One websocket that stops reading once subscribed.

    A *returning* one starts reading again once its server-side queue must
    have overflowed (``resume_after`` messages seen by the witness since the
    server's kernel buffer for it stopped growing), inside the server's 2 s
    closing grace: it shows which close frame the server queued. The others
    read only after the server closed its end.
    """

    def __init__(self, index: int, returning: bool = False) -> None:
        self.index = index
        self.returning = returning
        self.sock: socket.socket | None = None
        self.port = 0
        self.scanner = FrameScanner()
        self.stopped_ns = 0
        self.stopped_at = 0.0
        self.tx_max = 0
        self.tx_last_growth_s: float | None = None
        self.messages_at_growth: int | None = None
        self.resumed_s: float | None = None
        self.close_frame_s: float | None = None
        self.dropped_s: float | None = None
        self.state_at_drop: str | None = None
        self.drain: dict | None = None

    async def open(self, host: str, port: int, path: str, rcvbuf: int | None, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window scale
        sock.setblocking(False)
        self.sock = sock
        key = base64.b64encode(os.urandom(16)).decode()
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            self.port = sock.getsockname()[1]
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}:{port}\r\n\r\n"
            )
            await loop.sock_sendall(sock, request.encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                data += chunk
            head, rest = data.split(b"\r\n\r\n", 1)
            if b" 101 " not in head.split(b"\r\n", 1)[0] + b" ":
                raise ConnectionError(f"handshake refused: {head[:80]!r}")
            self.scanner.feed(rest)
            while not any(b'"type":"subscribed"' in t for t in self.scanner.texts):
                if self.scanner.texts:
                    raise ConnectionError(f"not subscribed: {self.scanner.texts[0][:200]!r}")
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise ConnectionError("closed before subscribed")
                self.scanner.feed(chunk)
        # From here on nothing reads this socket until read_rest().
        self.stopped_ns = time.time_ns()
        self.stopped_at = time.monotonic()

    async def read_rest(self, timeout: float) -> None:
        """Read again, until the stream ends: what did the server leave for us?"""
        loop = asyncio.get_running_loop()
        got = 0
        ended = "timeout"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await loop.sock_recv(self.sock, 1 << 20)
                    if not chunk:
                        ended = "eof"
                        break
                    got += len(chunk)
                    self.scanner.feed(chunk)
                    if self.scanner.close_code is not None and self.close_frame_s is None:
                        self.close_frame_s = time.monotonic() - self.stopped_at
        except TimeoutError:
            pass
        except ConnectionResetError:
            ended = "reset"
        self.drain = {
            "bytes": got,
            "frames": self.scanner.frames,
            "ended": ended,
            "close_code": self.scanner.close_code,
            "close_reason": self.scanner.close_reason,
        }

    async def read_forever(self) -> None:
        """The witness: read and count messages as any healthy client would."""
        loop = asyncio.get_running_loop()
        while chunk := await loop.sock_recv(self.sock, 1 << 20):
            self.scanner.feed(chunk)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def report(self) -> dict:
        def seconds(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "index": self.index,
            "returning": self.returning,
            "stopped_ns": self.stopped_ns,
            "server_tx_queue_max": self.tx_max,
            "kernel_full_s": seconds(self.tx_last_growth_s),
            "resumed_s": seconds(self.resumed_s),
            "close_frame_s": seconds(self.close_frame_s),
            "dropped_s": seconds(self.dropped_s),
            "state_at_drop": self.state_at_drop,
            "drain": self.drain,
        }


class SocketDiag:
    """The kernel's view of the *server's* end of a loopback connection (sock_diag netlink, as ``ss`` uses).

    One exact lookup per socket (a few microseconds), where ``/proc/net/tcp``
    would list every socket of the machine on every poll.
    """

    def __init__(self) -> None:
        self.nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)  # NETLINK_SOCK_DIAG
        self.seq = 0

    def server_end(self, server_port: int, client_port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """``(state, bytes the server's kernel holds unacknowledged)``; state ``"gone"`` if no such socket."""
        self.seq += 1
        addr = socket.inet_aton(host) + bytes(12)
        sockid = (
            struct.pack("!HH", server_port, client_port) + addr + addr + struct.pack("=III", 0, 2**32 - 1, 2**32 - 1)
        )
        req = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 0, 2**32 - 1) + sockid
        self.nl.send(struct.pack("=LHHLL", 16 + len(req), 20, 1, self.seq, 0) + req)  # SOCK_DIAG_BY_FAMILY, REQUEST
        while True:
            data = self.nl.recv(65536)
            if struct.unpack_from("=L", data, 8)[0] == self.seq:
                break
        if struct.unpack_from("=H", data, 4)[0] == 2:  # NLMSG_ERROR: no such socket
            return "gone", 0
        state = data[17]
        dport = struct.unpack_from("!H", data, 22)[0]
        if dport != client_port:  # a lookup that found no connection may answer with the listener
            return "gone", 0
        return f"{state:02X}", struct.unpack_from("=I", data, 16 + 4 + 48 + 8)[0]

    def close(self) -> None:
        self.nl.close()


async def run_stalled(cfg: dict, chan: Channel) -> None:
    host, port = cfg["host"], cfg["port"]
    path = f"/ws/?channel={cfg['channel']}"
    poll_s = float(cfg.get("poll_s", 0.1))
    resume_after = int(cfg["resume_after"])
    read_timeout = float(cfg.get("read_timeout_s", 5.0))
    current: list[Stalled] = []
    witness: Stalled | None = None
    tasks: set[asyncio.Task] = set()  # everything running (watcher, witness, reads)
    reads: set[asyncio.Task] = set()  # read_rest() of stalled sockets

    def report_failure(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            print(f"stalled client task failed: {task.exception()!r}", file=sys.stderr)

    def start(coro, *sets: set) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(report_failure)
        for group in (tasks, *sets):
            group.add(task)
            task.add_done_callback(group.discard)

    diag = SocketDiag()

    async def watch(group: list[Stalled], witness: Stalled) -> None:
        while True:
            now = time.monotonic()
            seen = witness.scanner.messages
            for s in group:
                if s.dropped_s is not None:
                    continue
                state, tx = diag.server_end(port, s.port)
                if state == "01":
                    if s.resumed_s is not None:
                        continue
                    if tx > s.tx_max:  # the server's kernel still takes data for it
                        s.tx_max, s.tx_last_growth_s, s.messages_at_growth = tx, now - s.stopped_at, seen
                    elif (
                        s.returning and s.messages_at_growth is not None and seen >= s.messages_at_growth + resume_after
                    ):
                        s.resumed_s = now - s.stopped_at
                        start(s.read_rest(read_timeout), reads)
                    continue
                s.dropped_s = now - s.stopped_at  # the server closed its end (or it is gone)
                s.state_at_drop = TCP_STATES.get(state, state)
                if s.resumed_s is None:
                    start(s.read_rest(read_timeout), reads)
            await asyncio.sleep(poll_s)

    async def stop_all() -> None:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    while True:
        cmd = await chan.next()
        if cmd["cmd"] == "stall":
            count, returning = int(cmd["count"]), int(cmd.get("returning", 0))
            current = [Stalled(i, returning=i < returning) for i in range(count)]
            witness = Stalled(-1)
            opened = await asyncio.gather(
                witness.open(host, port, path, None, 10.0),
                *(s.open(host, port, path, int(cfg["rcvbuf"]), 10.0) for s in current),
                return_exceptions=True,
            )
            if isinstance(opened[0], BaseException):
                raise opened[0]
            errors = Counter(f"{type(e).__name__}: {e}"[:120] for e in opened[1:] if isinstance(e, BaseException))
            current = [s for s, e in zip(current, opened[1:], strict=True) if not isinstance(e, BaseException)]
            start(witness.read_forever())
            start(watch(current, witness))
            chan.emit(
                "stalled",
                name=cmd["name"],
                count=len(current),
                returning=sum(s.returning for s in current),
                errors=dict(errors),
                rcvbuf=current[0].sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if current else None,
            )
        elif cmd["cmd"] == "release":
            # reads still running end by themselves (EOF or their timeout); then stop watching
            if reads:
                await asyncio.wait(set(reads), timeout=read_timeout + 1)
            await stop_all()
            reports = [s.report() for s in current]
            witnessed = witness.scanner.messages if witness else 0
            for s in [*current, *([witness] if witness else [])]:
                s.close()
            current, witness = [], None
            chan.emit("released", sockets=reports, witness_messages=witnessed)
        elif cmd["cmd"] in ("stop", "eof"):
            break
    await stop_all()
    for s in [*current, *([witness] if witness else [])]:
        s.close()
    diag.close()
    chan.emit("summary")
