"""Websockets that stop reading once subscribed (slow consumers). One that does not read cannot see the server close
its end, so the kernel is asked (sock_diag) about the server's end of each connection (``bench/README.md``)."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections import Counter

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

TCP_STATES = {"01": "ESTABLISHED", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE"}


class Stalled(WSListener):
    """One websocket (picows) that stops reading once subscribed, unless it is the witness; times are seconds since
    it stopped. Stopping pauses the transport: what the server sends then stays in the kernels' buffers."""

    def __init__(self, index: int, returning: bool = False, witness: bool = False) -> None:
        super().__init__()
        self.index, self.returning, self.witness = index, returning, witness
        self.subscribed = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.port, self.stopped_at, self.tx_max, self.messages, self.frames, self.bytes = 0, 0.0, 0, 0, 0, 0
        self.kernel_full_s = self.resumed_s = self.close_frame_s = self.dropped_s = self.messages_at_growth = None
        self.state_at_drop = self.close_code = self.drain = None
        self.close_reason = ""

    async def open(self, host: str, port: int, path: str, rcvbuf: int | None) -> None:
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window scale
        how = {"socket_factory": lambda _url: self.sock, "extra_headers": {"Origin": f"http://{host}:{port}"}}
        async with asyncio.timeout(10):
            self.transport, _ = await ws_connect(lambda: self, f"ws://{host}:{port}{path}", **how)
            self.port = self.sock.getsockname()[1]
            await self.subscribed

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.frames, self.bytes = self.frames + 1, self.bytes + len(frame.get_payload_as_bytes())
        if frame.msg_type == WSMsgType.CLOSE and self.close_code is None:
            self.close_code = getattr(frame.get_close_code(), "value", frame.get_close_code())
            self.close_reason = (frame.get_close_message() or b"").decode(errors="replace")
            self.close_frame_s = time.monotonic() - self.stopped_at
        elif frame.msg_type == WSMsgType.TEXT:
            self.messages += 1
            if self.subscribed.done():
                return
            if b'"type":"subscribed"' not in (payload := frame.get_payload_as_bytes()):
                self.subscribed.set_exception(ConnectionError(f"not subscribed: {payload[:200]!r}"))
                return
            if not self.witness:  # from here on nothing reads this socket until read_rest()
                transport.underlying_transport.pause_reading()
                self.stopped_at, self.frames, self.bytes = time.monotonic(), 0, 0
            self.subscribed.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError("closed before subscribed"))

    async def read_rest(self, timeout: float) -> None:
        """Read again until the stream ends: what did the server leave for us?"""
        self.transport.underlying_transport.resume_reading()
        try:
            await asyncio.wait_for(self.transport.wait_disconnected(), timeout)
            ended = "eof"
        except TimeoutError:
            ended = "timeout"
        self.drain = {"bytes": self.bytes, "frames": self.frames, "ended": ended, "close_code": self.close_code}
        self.drain["close_reason"] = self.close_reason

    def report(self) -> dict:
        out = {"index": self.index, "returning": self.returning, "server_tx_queue_max": self.tx_max}
        for field in ("kernel_full_s", "resumed_s", "close_frame_s", "dropped_s"):
            out[field] = None if getattr(self, field) is None else round(getattr(self, field), 3)
        return {**out, "state_at_drop": self.state_at_drop, "drain": self.drain}


class SocketDiag:
    """The kernel's view of the *server's* end of a loopback connection (sock_diag netlink, as ``ss``): one exact
    lookup per socket, where ``/proc/net/tcp`` would list every socket of the machine on every poll."""

    def __init__(self) -> None:
        self.nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)  # NETLINK_SOCK_DIAG
        self.seq = 0

    def server_end(self, server_port: int, client_port: int) -> tuple[str, int]:
        """``(state, bytes the server's kernel holds unacknowledged)``; ``"gone"`` if no such socket."""
        self.seq += 1
        addr = socket.inet_aton("127.0.0.1") + bytes(12)
        ports = struct.pack("!HH", server_port, client_port)
        sockid = ports + addr + addr + struct.pack("=III", 0, 2**32 - 1, 2**32 - 1)
        req = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 0, 2**32 - 1) + sockid
        self.nl.send(struct.pack("=LHHLL", 16 + len(req), 20, 1, self.seq, 0) + req)  # SOCK_DIAG_BY_FAMILY, REQUEST
        while struct.unpack_from("=L", (data := self.nl.recv(65536)), 8)[0] != self.seq:
            pass
        # NLMSG_ERROR: no such socket; a lookup that found no connection may answer with the listener
        if struct.unpack_from("=H", data, 4)[0] == 2 or struct.unpack_from("!H", data, 22)[0] != client_port:
            return "gone", 0
        return f"{data[17]:02X}", struct.unpack_from("=I", data, 16 + 4 + 48 + 8)[0]


def _report_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        print(f"stalled client task failed: {task.exception()!r}", file=sys.stderr)


class StalledGroup:
    """The stalled sockets of one window, their witness and the watcher that polls the kernel."""

    def __init__(self, cfg: dict, count: int, returning: int) -> None:
        self.cfg, self.diag, self.tasks, self.reads = cfg, SocketDiag(), set(), set()
        self.sockets = [Stalled(i, returning=i < returning) for i in range(count)]
        self.witness = Stalled(-1, witness=True)

    def start(self, coro, *groups: set) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(_report_failure)
        for group in (self.tasks, *groups):
            group.add(task)
            task.add_done_callback(group.discard)

    async def open(self) -> dict:
        host, port, path = self.cfg["host"], self.cfg["port"], f"/ws/?channel={self.cfg['channel']}"
        await self.witness.open(host, port, path, None)
        opening = (s.open(host, port, path, self.cfg["rcvbuf"]) for s in self.sockets)
        opened = await asyncio.gather(*opening, return_exceptions=True)
        errors = Counter(f"{type(e).__name__}: {e}"[:120] for e in opened if isinstance(e, BaseException))
        self.sockets = [s for s, e in zip(self.sockets, opened, strict=True) if not isinstance(e, BaseException)]
        self.start(self.watch())
        rcvbuf = self.sockets[0].sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if self.sockets else None
        returning = sum(s.returning for s in self.sockets)
        return {"count": len(self.sockets), "returning": returning, "errors": dict(errors), "rcvbuf": rcvbuf}

    async def watch(self) -> None:
        read_timeout = self.cfg.get("read_timeout_s", 5.0)
        while True:
            now, seen = time.monotonic(), self.witness.messages
            for s in (s for s in self.sockets if s.dropped_s is None):
                state, tx = self.diag.server_end(self.cfg["port"], s.port)
                if state != "01":  # the server closed its end (or it is gone)
                    s.dropped_s, s.state_at_drop = now - s.stopped_at, TCP_STATES.get(state, state)
                    if s.resumed_s is None:
                        self.start(s.read_rest(read_timeout), self.reads)
                elif s.resumed_s is None and tx > s.tx_max:  # the server's kernel still takes data for it
                    s.tx_max, s.kernel_full_s, s.messages_at_growth = tx, now - s.stopped_at, seen
                elif s.resumed_s is None and s.returning and s.messages_at_growth is not None:
                    if seen >= s.messages_at_growth + self.cfg["resume_after"]:
                        s.resumed_s = now - s.stopped_at
                        self.start(s.read_rest(read_timeout), self.reads)
            await asyncio.sleep(self.cfg.get("poll_s", 0.1))

    async def release(self) -> dict:
        """Let reads still running end (EOF or their timeout), stop watching, report and close."""
        if self.reads:
            await asyncio.wait(set(self.reads), timeout=self.cfg.get("read_timeout_s", 5.0) + 1)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for s in [*self.sockets, self.witness]:
            s.transport.disconnect()
        self.diag.nl.close()
        return {"sockets": [s.report() for s in self.sockets], "witness_messages": self.witness.messages}


async def run(cfg: dict, chan) -> None:
    group: StalledGroup | None = None
    while (cmd := await chan.next())["cmd"] not in ("stop", "eof"):
        if cmd["cmd"] == "stall":
            group = StalledGroup(cfg, int(cmd["count"]), int(cmd.get("returning", 0)))
            chan.emit("stalled", name=cmd["name"], **await group.open())
        elif cmd["cmd"] == "release" and group is not None:
            chan.emit("released", **await group.release())
            group = None
    if group is not None:
        await group.release()
