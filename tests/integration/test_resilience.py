"""Resilience: worker SIGKILL, Redis restarts, graceful reloads, slow consumers.

Real uWSGI from uwsgi.ini, real redis-server, real sockets on loopback. The
subscribers are raw websocket clients multiplexed on one selector thread
(:class:`Swarm`), so a test can hold a thousand of them. Each subscriber
behaves like the JS client: when its socket closes it reconnects with
``since=<last id it received>``. A :class:`Publisher` thread publishes through
the HTTP API and records what was acknowledged. The check is exact: every
subscriber must receive every acknowledged id published after its first
subscription, in order, exactly once (:func:`delivery_report`).

``tests/soak_run.py`` reuses these helpers for long runs (``make soak``).
"""

from __future__ import annotations

import base64
import errno
import http.client
import itertools
import json
import os
import random
import re
import selectors
import signal
import socket
import struct
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from offload.testing import LiveServer, RedisServer, frame, timeout_factor, wait_for
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(150)

StreamId = tuple[int, int]


# -- helpers -------------------------------------------------------------------


def parse_id(text: str) -> StreamId:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq)


def pack_id(stream_id: StreamId) -> int:
    """A stream id as one 64-bit int (ms < 2**42, seq < 2**22), in the same order."""
    ms, seq = stream_id
    assert seq < 1 << 22 and ms < 1 << 42, stream_id
    return ms << 22 | seq


def unpack_id(key: int) -> StreamId:
    return key >> 22, key & ((1 << 22) - 1)


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def worker_pids(server: LiveServer) -> list[int]:
    """Worker pids from the stats server; [] while it is down (reload)."""
    try:
        return sorted(server.worker_pids())
    except (OSError, ValueError):
        return []


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def _server_socket_inodes(port: int) -> set[str]:
    """Inodes of the established TCP sockets whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                        inodes.add(fields[9])
        except FileNotFoundError:
            pass
    return inodes


def connections_by_worker(server: LiveServer) -> dict[int, int]:
    """Worker pid -> established client connections it holds (from /proc)."""
    inodes = _server_socket_inodes(server.port)
    out = {}
    for pid in worker_pids(server):
        count = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    count += 1
        except FileNotFoundError:
            continue
        out[pid] = count
    return out


# -- the publisher ---------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes through the HTTP API and records each outcome.

    Every attempt carries a unique token (``data`` is the token, or
    ``{"n": token, "p": padding}``), so a subscriber knows which attempt a
    message came from. Outcomes:

    * ``acked``: 200 with an id; the message must be delivered.
    * ``refused``: 503 (Redis down: "nothing was published", per the
      protocol), another 4xx, or connection refused; it must never appear.
    * ``uncertain``: the request died in flight (a worker was SIGKILLed);
      the message may or may not have been published, so a subscriber may
      or may not get it, but at most once and in id order.
    """

    def __init__(
        self,
        server: LiveServer,
        channel: str,
        interval: tuple[float, float] = (0.010, 0.020),
        payload_bytes: int = 0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.channel = channel
        self.interval = interval
        self.padding = "x" * payload_bytes
        self.timeout = timeout
        self.token = 0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked: list[tuple[StreamId, int]] = []
        self.refused: list[tuple[int, str, float]] = []  # token, why, seconds
        self.uncertain: dict[int, str] = {}
        self.durations: list[tuple[float, float, str]] = []  # (started, seconds, outcome)
        self.rng = random.Random(f"publisher:{channel}")

    # one attempt ------------------------------------------------------------
    def publish_once(self, token: int | None = None) -> tuple[str, StreamId | None]:
        if token is None:
            with self.lock:
                self.token += 1
                token = self.token
        body = json.dumps({"n": token, "p": self.padding} if self.padding else token)
        started = time.monotonic()
        outcome, stream_id, why = "uncertain", None, ""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=self.timeout)
        try:
            conn.request(
                "POST",
                f"/api/publish/{self.channel}",
                body,
                {"Authorization": f"Bearer {self.server.api_key}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read()
            if resp.status == 200:
                outcome, stream_id = "acked", parse_id(json.loads(data)["id"])
            elif resp.status == 503 or 400 <= resp.status < 500:
                outcome, why = "refused", f"HTTP {resp.status}"
            else:
                why = f"HTTP {resp.status}: {data[:200]!r}"
        except ConnectionRefusedError:
            outcome, why = "refused", "connection refused"
        except (OSError, http.client.HTTPException) as exc:
            why = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        seconds = time.monotonic() - started
        with self.lock:
            self.durations.append((started, seconds, why or outcome))
            if outcome == "acked":
                self.acked.append((stream_id, token))
            elif outcome == "refused":
                self.refused.append((token, why, seconds))
            else:
                self.uncertain[token] = why
        return outcome, stream_id

    def publish_until_acked(self, deadline: float = 30.0) -> StreamId:
        """Publish one message, retrying (with new tokens) until acknowledged."""
        end = time.monotonic() + deadline
        while True:
            outcome, stream_id = self.publish_once()
            if outcome == "acked":
                return stream_id
            assert time.monotonic() < end, "could not publish for 30 s"
            time.sleep(0.05)

    # continuous mode --------------------------------------------------------
    def run(self) -> None:
        while not self.stop_event.is_set():
            self.publish_once()
            self.stop_event.wait(self.rng.uniform(*self.interval))

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(30)

    def last_acked(self) -> StreamId | None:
        with self.lock:
            return self.acked[-1][0] if self.acked else None


# -- the subscribers ---------------------------------------------------------------

_MESSAGE_RE = re.compile(rb'^\{"type":"message","channel":"[^"]*","id":"(\d+)-(\d+)","data":(?:\{"n":)?(\d+)[,}]')


@dataclass(eq=False)
class Subscriber:
    """One logical subscriber: a websocket that reconnects and resumes."""

    index: int
    channel: str
    reconnect: bool = True
    # what it got
    # ids received (packed, see pack_id) and the publisher's token of each, in arrival order
    keys: array = field(default_factory=lambda: array("Q"))
    tokens: array = field(default_factory=lambda: array("q"))
    last: StreamId | None = None  # newest id received (or the first subscription's start)
    first_start: StreamId | None = None  # last_id of its first "subscribed"
    subscribed: int = 0  # "subscribed" replies
    unrecovered: list[dict] = field(default_factory=list)  # "recovered": false on a resume
    disorder: list[tuple[StreamId, StreamId | None]] = field(default_factory=list)  # id <= previous
    errors: list[dict] = field(default_factory=list)
    closes: list[tuple[float, int | None]] = field(default_factory=list)  # (time, code) of server close frames
    drops: list[float] = field(default_factory=list)  # EOF/RST without a close frame
    handshake_failures: Counter = field(default_factory=Counter)
    connects: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)  # connects, replies, closes (for reports)
    # socket state (owned by the swarm thread)
    state: str = "idle"  # idle, connecting, handshake, open
    live: bool = False  # subscribed on the current socket
    sock: socket.socket | None = None
    rbuf: bytearray = field(default_factory=bytearray)
    wbuf: bytearray = field(default_factory=bytearray)
    due: float = 0.0  # when to (re)connect
    deadline: float = 0.0  # handshake deadline
    failures: int = 0  # consecutive failed attempts (backoff)
    opened_at: float = 0.0

    @property
    def received(self) -> list[tuple[StreamId, int]]:
        return [(unpack_id(k), t) for k, t in zip(self.keys, self.tokens, strict=True)]

    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))
        del self.events[:-40]

    def path(self) -> str:
        path = f"/ws/?channel={self.channel}"
        if self.last is not None:
            path += f"&since={format_id(self.last)}"
        return path


class Swarm(threading.Thread):
    """Many websocket subscribers on one selector thread (raw sockets).

    Server frames are parsed by hand; pings are answered; a close frame is
    recorded and answered, then the subscriber reconnects with ``since``
    after a jittered delay, like offload.js (see :meth:`_disconnect`).
    """

    def __init__(
        self,
        port: int,
        subscribers: list[Subscriber],
        max_connecting: int = 128,
        seed: int = 0,
        cookie: str = "",
        source: Callable[[Subscriber], str] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.source = source  # the local address each subscriber connects from (default: any)
        self.cookie = f"Cookie: {cookie}\r\n" if cookie else ""
        self.subs = subscribers
        self.max_connecting = max_connecting
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.connecting = 0

    # public ---------------------------------------------------------------
    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        for sub in self.subs:
            self._close_socket(sub)
        self.sel.close()
        error, self.error = self.error, None
        if error is not None:
            raise AssertionError(f"swarm thread failed: {error!r}") from error

    def all_live(self) -> bool:
        if self.error is not None:
            raise AssertionError(f"swarm thread failed: {self.error!r}") from self.error
        return all(s.live for s in self.subs if s.reconnect)

    def count(self, predicate) -> int:
        return sum(1 for s in self.subs if predicate(s))

    # the loop -------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for key, mask in self.sel.select(timeout=0.02):
                    sub = key.data
                    if sub.sock is None or key.fileobj is not sub.sock:
                        continue
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._writable(sub)
                        if mask & selectors.EVENT_READ and sub.sock is not None:
                            self._readable(sub)
                    except OSError:
                        self._lost(sub)
                self._timers()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def _timers(self) -> None:
        now = time.monotonic()
        for sub in self.subs:
            if sub.state == "idle":
                if sub.reconnect and sub.due <= now and self.connecting < self.max_connecting:
                    self._connect(sub)
            elif sub.state in ("connecting", "handshake") and now > sub.deadline:
                sub.handshake_failures["timeout"] += 1
                self._retry(sub)

    def _connect(self, sub: Subscriber) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.source is not None:
            sock.bind((self.source(sub), 0))
        err = sock.connect_ex(("127.0.0.1", self.port))
        sub.sock, sub.rbuf, sub.wbuf = sock, bytearray(), bytearray()
        sub.connects += 1
        sub.note("tcp connect")
        sub.live = False
        sub.deadline = time.monotonic() + 15
        self.connecting += 1
        if err not in (0, errno.EINPROGRESS):
            sub.state = "connecting"
            sub.handshake_failures[errno.errorcode.get(err, str(err))] += 1
            self._retry(sub)
            return
        sub.state = "connecting"
        self.sel.register(sock, selectors.EVENT_WRITE, sub)

    def _writable(self, sub: Subscriber) -> None:
        if sub.state == "connecting":
            err = sub.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sub.handshake_failures[errno.errorcode.get(err, str(err))] += 1
                self._retry(sub)
                return
            key = base64.b64encode(os.urandom(16)).decode()
            path = sub.path()
            sub.note(f"connect {path}")
            sub.wbuf += (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: http://127.0.0.1:{self.port}\r\n{self.cookie}\r\n"
            ).encode()
            sub.state = "handshake"
        if sub.wbuf:
            sent = sub.sock.send(sub.wbuf)
            del sub.wbuf[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if sub.wbuf else 0)
        self.sel.modify(sub.sock, events, sub)

    def _send(self, sub: Subscriber, data: bytes) -> None:
        sub.wbuf += data
        try:
            sent = sub.sock.send(sub.wbuf)
        except BlockingIOError:
            sent = 0
        del sub.wbuf[:sent]
        if sub.wbuf:
            self.sel.modify(sub.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sub)

    def _readable(self, sub: Subscriber) -> None:
        try:
            chunk = sub.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if sub.state == "handshake":
                sub.handshake_failures["eof"] += 1
                self._retry(sub)
            else:
                self._lost(sub)
            return
        sub.rbuf += chunk
        if sub.state == "handshake":
            end = sub.rbuf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = sub.rbuf[: sub.rbuf.find(b"\r\n")].split(b" ")[1:2]
            if status != [b"101"]:
                sub.handshake_failures[f"http {status[0].decode() if status else '?'}"] += 1
                self._retry(sub)
                return
            del sub.rbuf[: end + 4]
            sub.state = "open"
            sub.opened_at = time.monotonic()
            self.connecting -= 1
        self._frames(sub)

    def _frames(self, sub: Subscriber) -> None:
        buf = sub.rbuf
        pos = 0
        while sub.sock is not None:
            if len(buf) - pos < 2:
                break
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if len(buf) - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif length == 127:
                if len(buf) - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if len(buf) - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if not b0 & 0x80 or opcode == 0:  # the server sends whole messages only
                sub.errors.append({"type": "fragmented server frame", "opcode": opcode})
            elif opcode == 1:
                self._text(sub, payload)
            elif opcode == 9:
                self._send(sub, frame(10, payload))
            elif opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                sub.closes.append((time.monotonic(), code))
                sub.note(f"close {code}")
                try:
                    self._send(sub, frame(8, payload[:2]))
                except OSError:
                    pass
                self._disconnect(sub)
                return
        del buf[:pos]

    def _text(self, sub: Subscriber, payload: bytes) -> None:
        match = _MESSAGE_RE.match(payload)
        if match:
            stream_id, token = (int(match.group(1)), int(match.group(2))), int(match.group(3))
        else:
            message = json.loads(payload)
            kind = message.get("type")
            if kind == "subscribed":
                sub.note(payload.decode())
                sub.live = True
                sub.subscribed += 1
                start = parse_id(message["last_id"]) if message.get("last_id") else None
                if sub.first_start is None and sub.subscribed == 1:
                    sub.first_start = start
                    if sub.last is None:
                        sub.last = start
                elif not message.get("recovered"):
                    sub.unrecovered.append(message)
                return
            if kind == "presence":  # a room channel's joins and leaves: not a message
                return
            if kind != "message":
                sub.errors.append(message)
                if kind == "error":  # e.g. "unavailable" while Redis is down: try again
                    self._disconnect(sub)
                return
            data = message["data"]
            stream_id, token = parse_id(message["id"]), data["n"] if isinstance(data, dict) else data
        if sub.last is not None and stream_id <= sub.last:
            sub.disorder.append((stream_id, sub.last))
        sub.keys.append(pack_id(stream_id))
        sub.tokens.append(token)
        sub.last = stream_id

    def _lost(self, sub: Subscriber) -> None:
        """The connection ended without a close frame (EOF, reset)."""
        if sub.state != "open":
            sub.handshake_failures["connection lost"] += 1
            self._retry(sub)
            return
        sub.drops.append(time.monotonic())
        sub.note("dropped")
        self._disconnect(sub)

    def _retry(self, sub: Subscriber) -> None:
        sub.note(f"failed ({sub.state}): {dict(sub.handshake_failures)}")
        self._disconnect(sub)

    def _close_socket(self, sub: Subscriber) -> None:
        if sub.sock is not None:
            try:
                self.sel.unregister(sub.sock)
            except (KeyError, ValueError):
                pass
            sub.sock.close()
            sub.sock = None

    def _disconnect(self, sub: Subscriber) -> None:
        """Close the socket and schedule the reconnect like offload.js does.

        After a restart close (1001, 1012) of an open socket: 100-750 ms.
        Otherwise full jitter, 500 ms doubling per consecutive failure
        (capped at 15 s); a socket that stayed open 5 s resets the count.
        """
        if sub.state in ("connecting", "handshake"):
            self.connecting -= 1
        now = time.monotonic()
        was_open = sub.state == "open"
        if was_open and now - sub.opened_at >= 5.0:
            sub.failures = 0
        code = sub.closes[-1][1] if sub.closes and sub.closes[-1][0] >= sub.opened_at else None
        if was_open and code in (1001, 1012):
            delay = self.rng.uniform(0.1, 0.75)
        else:
            delay = self.rng.uniform(0, min(15.0, 0.5 * 2**sub.failures))
            sub.failures += 1
        self._close_socket(sub)
        sub.state = "idle"
        sub.live = False
        sub.due = now + delay


# -- the exact delivery check -------------------------------------------------------


@dataclass
class DeliveryReport:
    subscribers: int
    acked: int
    uncertain: int
    expected_total: int = 0
    received_total: int = 0
    missing: dict[int, list[StreamId]] = field(default_factory=dict)
    duplicates: dict[int, list[StreamId]] = field(default_factory=dict)
    unexpected: dict[int, list[tuple[StreamId, int]]] = field(default_factory=dict)
    disorder: dict[int, list] = field(default_factory=dict)
    unrecovered: dict[int, int] = field(default_factory=dict)
    uncertain_delivered: int = 0
    refused_delivered: int = 0  # deliveries of publishes answered 503
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicates or self.unexpected or self.disorder)

    def summary(self) -> str:
        def first(d):
            return {k: v[:5] for k, v in list(d.items())[:5]}

        return (
            f"{self.subscribers} subscribers, {self.acked} acked ids ({self.uncertain} uncertain), "
            f"{self.received_total}/{self.expected_total} deliveries "
            f"(+{self.uncertain_delivered} of uncertain publishes, +{self.refused_delivered} of refused ones); "
            f"missing in {len(self.missing)} {first(self.missing)}, "
            f"duplicates in {len(self.duplicates)} {first(self.duplicates)}, "
            f"unexpected in {len(self.unexpected)} {first(self.unexpected)}, "
            f"out of order in {len(self.disorder)} {first(self.disorder)}, "
            f"'recovered: false' in {len(self.unrecovered)} (resumes whose since had left the history: "
            f"missing ids there are the documented history limit, elsewhere they are lost messages)"
            + "".join(self.details[:3])
        )


def delivery_report(subscribers: list[Subscriber], publisher: Publisher) -> DeliveryReport:
    """Each subscriber: received == acked ids after its first subscription, in order, once.

    Messages of uncertain attempts (the request died in flight) may be present
    or absent, but never twice and never out of order. So may messages whose
    publish was refused with a 503 while the command had in fact run (Redis
    stopped before answering; see
    test_a_publish_is_published_at_most_once_and_never_after_a_503): they are
    counted in ``refused_delivered``. A token that arrives under two ids
    (published twice) is a duplicate.
    """
    with publisher.lock:
        acked = list(publisher.acked)
        uncertain = set(publisher.uncertain)
        refused = {token for token, _, _ in publisher.refused}
    acked_tokens = {token for _, token in acked}
    acked_keys = [pack_id(i) for i, _ in acked]
    report = DeliveryReport(len(subscribers), len(acked), len(uncertain))
    for sub in subscribers:
        start = pack_id(sub.first_start or (0, 0))
        expected = [k for k in acked_keys if k > start]
        pairs = list(zip(sub.keys, sub.tokens, strict=True))
        got = [k for k, token in pairs if token not in uncertain and token not in refused]
        report.expected_total += len(expected)
        report.received_total += len(got)
        report.uncertain_delivered += sum(1 for _, token in pairs if token in uncertain)
        report.refused_delivered += sum(1 for _, token in pairs if token in refused)
        key_counts, token_counts = Counter(sub.keys), Counter(sub.tokens)
        dups = {k for k, n in key_counts.items() if n > 1} | {k for k, t in pairs if token_counts[t] > 1}
        if dups:
            report.duplicates[sub.index] = sorted(unpack_id(k) for k in dups)
        if got != expected:
            missing = sorted(set(expected) - set(got))
            if missing:
                report.missing[sub.index] = [unpack_id(k) for k in missing]
        expected_set = set(expected)
        strangers = [
            (unpack_id(k), t)
            for k, t in pairs
            if (t not in acked_tokens and t not in uncertain and t not in refused)
            or (t in acked_tokens and k not in expected_set)
        ]
        if strangers:
            report.unexpected[sub.index] = strangers
        if any(b <= a for a, b in itertools.pairwise(sub.keys)) or sub.disorder:
            report.disorder[sub.index] = sub.disorder[:5] or ["received ids not increasing"]
        if sub.unrecovered:
            report.unrecovered[sub.index] = len(sub.unrecovered)
        if sub.index in report.missing or sub.index in report.duplicates or sub.index in report.disorder:
            t0 = sub.events[0][0] if sub.events else 0
            events = "\n    ".join(f"{t - t0:7.3f} {what}" for t, what in sub.events)
            report.details.append(
                f"\n  subscriber {sub.index}: first start {sub.first_start}, {len(sub.keys)} received, "
                f"last {sub.last}\n    {events}"
            )
    return report


def resubscribe_latencies(subscribers: list[Subscriber], after: float) -> list[float]:
    """Seconds from each subscriber's first disconnect after ``after`` to its next subscription."""
    out = []
    for sub in subscribers:
        lost = None
        for t, what in sub.events:
            if lost is None and t >= after and (what == "dropped" or what.startswith("close")):
                lost = t
            elif lost is not None and what.startswith('{"type":"subscribed"'):
                out.append(t - lost)
                break
    return sorted(out)


def wait_caught_up(subscribers: list[Subscriber], publisher: Publisher, timeout: float) -> None:
    """Wait until every subscriber has the last acknowledged id."""
    last = publisher.last_acked()
    wait_for(
        lambda: all(s.last is not None and s.last >= last for s in subscribers),
        timeout,
        f"every subscriber to receive {last} "
        f"(behind: {[s.index for s in subscribers if s.last is None or s.last < last][:20]})",
    )


# -- the stack and the faults (shared with tests/soak_run.py) ----------------------------


def first_loss_after(sub: Subscriber, after: float) -> tuple[float, int | None] | None:
    """``(time, close code or None for a drop)`` of the first disconnect after ``after``."""
    events = [(t, code) for t, code in sub.closes if t >= after] + [(t, None) for t in sub.drops if t >= after]
    return min(events, key=lambda e: e[0]) if events else None


@dataclass(eq=False)
class Stack:
    """A live server (maybe with its own Redis), subscribers and a publisher."""

    server: LiveServer
    redis: RedisServer | None
    subs: list[Subscriber]
    swarm: Swarm
    publisher: Publisher
    workers: int

    @classmethod
    def start(
        cls,
        directory,
        subscribers: int,
        channel: str,
        workers: int = 2,
        own_redis: bool = True,
        env: dict | None = None,
        interval: tuple[float, float] = (0.010, 0.020),
        user: str | None = None,
    ) -> Stack:
        """Start it all; ``user`` logs the subscribers in (``room:`` channels need it)."""
        redis = RedisServer(directory / "redis").start() if own_redis else None
        server_env = {"WORKERS": str(workers), "OFFLOAD_PING_INTERVAL": "2", "OFFLOAD_PING_TIMEOUT": "4", **(env or {})}
        try:
            server = DemoServer(directory / "var", env=server_env, redis_url=redis and redis.url).prepare().start()
        except BaseException:
            if redis is not None:
                redis.stop()
            raise
        cookie = ""
        if user:
            session = server.http()
            session.login(user)
            cookie = session.cookie_header()
        publisher = Publisher(server, channel, interval=interval)
        subs = [Subscriber(i, channel) for i in range(subscribers)]
        swarm = Swarm(server.port, subs, cookie=cookie)
        stack = cls(server, redis, subs, swarm, publisher, workers)
        try:
            publisher.publish_until_acked()  # history exists: every "subscribed" has a last_id
            swarm.start()
            wait_for(swarm.all_live, 60, f"{subscribers} subscriptions")
        except BaseException:
            stack.stop()
            raise
        return stack

    def stop(self) -> None:
        self.publisher.stop()
        try:
            if self.swarm.ident is not None:  # started
                self.swarm.stop()
        finally:
            self.server.stop()
            if self.redis is not None:
                self.redis.stop()

    def settle(self, timeout: float = 30) -> None:
        wait_for(
            self.swarm.all_live,
            timeout,
            f"every subscriber to resubscribe ({self.swarm.count(lambda s: not s.live)} not live)",
        )

    # -- faults: each returns what it measured and asserts its own promises ------

    def redis_restart(self, down_for: float = 2.0) -> dict:
        """Stop Redis, let publishes fail, start it again (same data)."""
        assert self.redis is not None
        pub = self.publisher
        self.redis.stop()
        down_at = time.monotonic()
        time.sleep(down_for)
        restart_at = time.monotonic()  # from here on publishes may succeed again
        self.redis.start()
        up_at = time.monotonic()
        wait_for(
            lambda: any(started >= up_at and label == "acked" for started, _, label in list(pub.durations)),
            20,
            "a publish to succeed after Redis came back",
        )
        during = [(sec, label) for started, sec, label in list(pub.durations) if down_at <= started < restart_at]
        failed = [(seconds, label) for seconds, label in during if label != "acked"]
        lost_sockets = [s.index for s in self.subs if first_loss_after(s, down_at)]
        measured = {
            "redis_down_s": round(restart_at - down_at, 2),
            "publishes_while_down": len(during),
            "failed_503": sum(1 for _, label in failed if label == "HTTP 503"),
            "slowest_failure_s": round(max((sec for sec, _ in failed), default=0.0), 3),
            "sockets_closed": len(lost_sockets),
        }
        assert during and len(failed) == len(during), f"publishes succeeded while Redis was down: {measured}"
        assert all(label == "HTTP 503" for _, label in failed), f"not 503: {Counter(lb for _, lb in failed)}"
        assert measured["slowest_failure_s"] < 2.0, f"a publish hung while Redis was down: {measured}"
        assert not lost_sockets, f"sockets closed during the Redis outage: {lost_sockets[:10]} {measured}"
        return measured

    def reload(self, timeout: float = 30) -> dict:
        """Graceful reload (SIGHUP to the master): 1012 for everyone, new workers fast."""
        old = worker_pids(self.server)
        hup_at = time.monotonic()
        os.kill(self.server.proc.pid, signal.SIGHUP)
        wait_for(
            lambda: all(first_loss_after(s, hup_at) for s in self.subs),
            10,
            "every socket to be closed by the reload",
        )
        losses = [first_loss_after(s, hup_at) for s in self.subs]
        codes = Counter(code for _, code in losses)
        closed_in = max(t for t, _ in losses) - hup_at
        pids = wait_for(
            lambda: (p := worker_pids(self.server)) and len(p) == self.workers and not set(p) & set(old) and p,
            timeout,
            "new workers after the reload",
        )
        wait_for(lambda: self.server.http().request("GET", "/healthz", timeout=2)[0] == 200, 10, "healthz")
        serving_in = time.monotonic() - hup_at
        self.settle()
        resubscribed = resubscribe_latencies(self.subs, hup_at)
        measured = {
            "close_codes": dict(codes),
            "all_closed_within_s": round(closed_in, 2),
            "new_workers_serving_s": round(serving_in, 2),
            "resubscribed_max_s": round(resubscribed[-1], 2) if resubscribed else None,
            "old_pids": old,
            "new_pids": pids,
        }
        assert codes == {1012: len(self.subs)}, f"not every socket got 1012: {measured}"
        assert closed_in < 5, f"closing the sockets took too long: {measured}"
        return measured

    def kill_worker(self) -> dict:
        """SIGKILL the worker holding the most sockets; the master respawns it."""
        held = connections_by_worker(self.server)
        victim = max(held, key=held.get)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        pids = wait_for(
            lambda: (p := worker_pids(self.server)) and len(p) == self.workers and victim not in p and p,
            20,
            "the master to respawn the killed worker",
        )
        respawned_in = time.monotonic() - killed_at
        if held[victim]:
            wait_for(lambda: any(first_loss_after(s, killed_at) for s in self.subs), 10, "the victim's clients")
        self.settle()
        losses = [first_loss_after(s, killed_at) for s in self.subs]
        dropped = [loss for loss in losses if loss]
        resubscribed = resubscribe_latencies(self.subs, killed_at)
        measured = {
            "victim_held": held[victim],
            "held": dict(held),
            "clients_dropped": len(dropped),
            "close_frames": sum(1 for _, code in dropped if code is not None),
            "respawned_in_s": round(respawned_in, 2),
            "resubscribed_max_s": round(resubscribed[-1], 2) if resubscribed else None,
            "new_pids": pids,
        }
        # The victim's sockets die with it (no close frame); the others stay.
        # (The victim may also hold the publisher's HTTP connection.)
        assert held[victim] - 1 <= len(dropped) <= held[victim], f"wrong clients dropped: {measured}"
        return measured

    def finish(self, timeout: float = 30) -> DeliveryReport:
        """Stop publishing, wait for everyone to catch up, check delivery exactly."""
        self.publisher.stop()
        wait_caught_up(self.subs, self.publisher, timeout)
        return delivery_report(self.subs, self.publisher)


def check_log(server: LiveServer) -> None:
    log = server.log_text()
    for needle in ("Segmentation Fault", "Traceback", "websocket endpoint failed", "the thread pool did not run"):
        assert needle not in log, f"{needle!r} in the uWSGI log:\n{log[log.find(needle) - 500 :][:3000]}"


def test_the_delivery_check_catches_gaps_duplicates_strangers_and_disorder():
    """The exact check itself (no server): it must flag each kind of mistake."""
    publisher = Publisher.__new__(Publisher)
    publisher.lock = threading.Lock()
    publisher.acked = [((100, 10 * n), n) for n in range(1, 6)]  # ids 100-10 .. 100-50, tokens 1..5
    publisher.uncertain = {9: "connection reset"}
    publisher.refused = [(8, "HTTP 503", 0.01)]

    def sub(index, seqs_tokens, start=(100, 0)):
        s = Subscriber(index, "public:x", first_start=start)
        for seq, token in seqs_tokens:
            s.keys.append(pack_id((100, seq)))
            s.tokens.append(token)
        return s

    everything = [(10 * n, n) for n in range(1, 6)]
    good = sub(0, everything)
    late = sub(1, everything[2:], start=(100, 20))  # subscribed after 100-20
    maybe = sub(2, [*everything[:4], (45, 9), everything[4]])  # got the uncertain attempt too
    gap = sub(3, [everything[i] for i in (0, 1, 3, 4)])
    dup = sub(4, [everything[i] for i in (0, 1, 2, 2, 3, 4)])
    stranger = sub(5, [*everything, (60, 7)])
    swapped = sub(6, [everything[i] for i in (0, 2, 1, 3, 4)])
    twice = sub(7, [everything[0], (15, 1), *everything[1:]])  # token 1 published again as 100-15
    refused = sub(8, [*everything[:2], (25, 8), *everything[2:]])  # answered 503, yet published
    report = delivery_report([good, late, maybe, gap, dup, stranger, swapped, twice, refused], publisher)
    assert report.missing == {3: [(100, 30)]}
    assert report.duplicates == {4: [(100, 30)], 7: [(100, 10), (100, 15)]}
    assert report.unexpected == {5: [((100, 60), 7)], 7: [((100, 15), 1)]}
    assert set(report.disorder) == {4, 6}
    assert (report.uncertain_delivered, report.refused_delivered) == (1, 1)
    assert delivery_report([good, late, maybe, refused], publisher).ok


# -- a. worker SIGKILL ------------------------------------------------------------------


def test_worker_sigkill_clients_reconnect_and_resume_without_loss(tmp_path):
    stack = Stack.start(tmp_path, subscribers=50, channel=f"public:kill-{os.getpid()}", own_redis=False)
    try:
        stack.publisher.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        measured = stack.kill_worker()
        time.sleep(1.0)  # keep publishing after everyone is back
        published_meanwhile = sum(1 for started, _, label in stack.publisher.durations if started >= killed_at)
        report = stack.finish()
        check_log(stack.server)
    finally:
        stack.stop()
    print(f"\nworker SIGKILL: {measured}; {published_meanwhile} publish attempts after the kill; {report.summary()}")
    assert measured["clients_dropped"] > 0, "no client saw its connection drop"
    assert all(s.subscribed >= 2 for s in stack.subs if first_loss_after(s, killed_at)), "a client did not resubscribe"
    assert report.ok, report.summary()
    assert report.expected_total > 0


# -- b. everything at once ----------------------------------------------------------------


def test_no_gap_no_duplicate_through_redis_restart_reload_and_worker_kill(tmp_path):
    # A room channel: logged-in sockets (session cookie) through every fault;
    # the other tests use public channels and anonymous sockets.
    stack = Stack.start(tmp_path, subscribers=100, channel=f"room:chaos-{os.getpid()}", user="alice")
    steps = {}
    try:
        stack.publisher.start()
        time.sleep(1.5)
        steps["redis restart"] = stack.redis_restart()
        time.sleep(1.5)
        steps["graceful reload"] = stack.reload()
        time.sleep(1.5)
        steps["worker SIGKILL"] = stack.kill_worker()
        time.sleep(1.5)
        report = stack.finish()
        check_log(stack.server)
    finally:
        stack.stop()
    pub = stack.publisher
    print(
        f"\npublisher: {len(pub.acked)} acked, {len(pub.refused)} refused, {len(pub.uncertain)} uncertain; "
        + "; ".join(f"{name}: {values}" for name, values in steps.items())
        + f"\n{report.summary()}"
    )
    assert report.ok, report.summary()
    assert report.expected_total > 0


# -- c. graceful reload with a thousand clients ----------------------------------------------


def test_graceful_reload_with_1000_clients_is_fast_and_loses_nothing(tmp_path):
    started = time.monotonic()
    stack = Stack.start(
        tmp_path,
        subscribers=1000,
        channel=f"public:reload-{os.getpid()}",
        workers=1,
        own_redis=False,
        interval=(0.05, 0.1),  # x1000 sockets: the test's own client is one Python thread
    )
    connected_in = time.monotonic() - started
    try:
        stack.publisher.start()
        time.sleep(1.0)
        measured = stack.reload()
        time.sleep(1.0)
        report = stack.finish()
        check_log(stack.server)
    finally:
        stack.stop()
    print(
        f"\n1000 clients connected in {connected_in:.1f} s (with uWSGI start); reload: {measured}; {report.summary()}"
    )
    # uwsgi.ini's worker-reload-mercy is 15 s: a reload that waited for the
    # sockets instead of closing them would take that long.
    assert measured["new_workers_serving_s"] < 8, measured
    assert report.ok, report.summary()
    assert report.expected_total > 0


def test_reloaded_workers_resolve_session_users_in_their_thread_pools(tmp_path):
    """Each reload brings fresh workers, and 300 logged-in sockets reconnect to them at once: their session
    lookups run in gevent's thread pool. The first lookups of a worker imported Django's session serializer in
    several native threads at once and stalled on its import lock (green under gevent): after 2.5 s the lookup
    ran inline, or, with the lock still held, the handshake timed out with 503. Measured before the fix: 5 to 7
    stalls in 15 reloads; the application now imports those modules at load (offload.views.preload_identity_modules)."""
    stack = Stack.start(tmp_path, subscribers=300, channel=f"room:reloads-{os.getpid()}", user="alice")
    try:
        for _ in range(15):
            stack.reload()
            stack.settle()
        check_log(stack.server)  # "the thread pool did not run ...: running it inline"
        assert "handshake timed out" not in stack.server.log_text()
    finally:
        stack.stop()


# -- d. slow consumers ------------------------------------------------------------------------


def tcp_states(server_port: int) -> dict[int, tuple[str, int]]:
    """Client port -> (state, send queue bytes) of the server side of each connection."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == server_port:
                out[int(fields[2].rsplit(":", 1)[1], 16)] = (fields[3], int(fields[4].split(":")[0], 16))
    return out


class StalledClient:
    """Connects, subscribes, reads the "subscribed" reply, then never reads again.

    A small receive buffer, and a small MSS so that the server's send buffer
    (sized from the MSS by the kernel) stays small too: a few dozen messages
    fill both, instead of megabytes.
    """

    def __init__(self, port: int, channel: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1024)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws/?channel={channel} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: http://127.0.0.1:{port}\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b'"subscribed"' not in buf:
            chunk = self.sock.recv(4096)
            assert chunk, f"stalled client: no subscription ({buf[:200]!r})"
            buf += chunk

    def drain(self, timeout: float) -> tuple[int, str]:
        """Read everything to the end: (complete message frames, how it ended)."""
        self.sock.settimeout(timeout)
        data = bytearray()
        ended = "timeout"
        try:
            while chunk := self.sock.recv(1 << 20):
                data += chunk
            ended = "EOF"
        except ConnectionResetError:
            ended = "reset"
        except TimeoutError:
            pass
        frames, pos = 0, 0
        while len(data) - pos >= 2:
            length, head = data[pos + 1] & 0x7F, 2
            if length == 126:
                length, head = struct.unpack_from("!H", data, pos + 2)[0], 4
            elif length == 127:
                length, head = struct.unpack_from("!Q", data, pos + 2)[0], 10
            if len(data) - pos < head + length:
                ended += " (after a partial frame)"
                break
            if data[pos] & 0x0F == 8:
                code = struct.unpack_from("!H", data, pos + head)[0]
                return frames, f"close {code} {bytes(data[pos + head + 2 : pos + head + length]).decode()!r}"
            frames += 1
            pos += head + length
        return frames, ended


def test_slow_consumers_are_cut_off_while_fast_ones_get_everything(tmp_path):
    # Long ping timeouts: only the slow-consumer limit may close the stalled sockets quickly.
    env = {"OFFLOAD_MAX_QUEUED_BYTES": "240000", "OFFLOAD_PING_INTERVAL": "20", "OFFLOAD_PING_TIMEOUT": "30"}
    channel = f"public:slow-{os.getpid()}"
    stack = Stack.start(tmp_path, subscribers=200, channel=channel, workers=1, own_redis=False, env=env)
    stack.publisher.padding = "x" * 12_000  # about 12 KB per message (the limit is 64 KB)
    rss: list[tuple[float, float]] = []
    sampling = threading.Event()
    stalled: list[StalledClient] = []
    try:
        worker = worker_pids(stack.server)[0]
        stalled += [StalledClient(stack.server.port, channel) for _ in range(10)]

        def sample():
            while not sampling.is_set():
                rss.append((time.monotonic(), rss_mb(worker)))
                sampling.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wait_for(lambda: len(rss) >= 6, 5, "a baseline of worker RSS samples")  # before any message
        for _ in range(80):
            stack.publisher.publish_once()
        published_at = time.monotonic()
        backed_up = {c.port: tcp_states(stack.server.port).get(c.port) for c in stalled}
        wait_caught_up(stack.subs, stack.publisher, 10)
        fast_done_in = time.monotonic() - published_at

        def closed_by_server():
            states = tcp_states(stack.server.port)
            return all(states.get(c.port, ("gone", 0))[0] != "01" for c in stalled)

        wait_for(closed_by_server, 15, "the server to close the stalled sockets")
        stalled_closed_in = time.monotonic() - published_at
        report = stack.finish()
        sampling.set()
        sampler.join()
        endings = Counter(end for _, end in (c.drain(10) for c in stalled))
        check_log(stack.server)
    finally:
        sampling.set()
        for client in stalled:
            client.sock.close()
        stack.stop()
    base = rss[0][1]
    peak = max(mb for _, mb in rss)
    fast_drops = sum(len(s.closes) + len(s.drops) for s in stack.subs)
    print(
        f"\nslow consumers: {len(stack.publisher.acked)} messages of 12 KB; stalled sockets backed up "
        f"(server state, send queue): {sorted(backed_up.values())[:3]}...; closed by the server "
        f"{stalled_closed_in:.1f} s after the last publish; they saw: {dict(endings)}; fast clients had "
        f"everything {fast_done_in:.2f} s after it, {fast_drops} disconnects; worker RSS {base:.0f} MB -> "
        f"peak {peak:.0f} MB; {report.summary()}"
    )
    assert all(state and state[1] > 0 for state in backed_up.values()), f"not all stalled: {backed_up}"
    assert fast_drops == 0, "a fast client was disconnected"
    assert report.ok, report.summary()
    assert fast_done_in < 5, "fast clients waited for the stalled ones"
    assert set(endings) <= {"close 1008 'slow consumer'", "EOF", "EOF (after a partial frame)", "reset"}, endings
    assert peak - base < 100, f"worker RSS grew from {base:.0f} MB to {peak:.0f} MB"


# -- live delivery after a Redis restart (regression) --------------------------------------


def test_live_delivery_resumes_before_the_history_window_is_exceeded_after_a_redis_restart(tmp_path):
    # Found by the soak run: the hub retried Redis on a backoff of up to 2 s
    # while publishes through the same server already succeeded again, so a
    # channel's history (100 messages for public) was trimmed before the
    # sockets re-read it: messages lost, with "recovered": false.
    stack = Stack.start(tmp_path, subscribers=5, channel=f"public:burst-{os.getpid()}", workers=1)
    try:
        stack.redis.stop()
        time.sleep(2.0)  # the hub is between retries (0.1, 0.3, 0.8, 1.8, then 3.8 s after the loss)
        stack.redis.start()
        back_at = time.monotonic()
        # About 120 messages/s for 1.3 s: the 100-message history covers ~0.8 s of
        # it, so live delivery must be back well before then.
        for n in range(156):
            time.sleep(max(0.0, back_at + n / 120 - time.monotonic()))
            stack.publisher.publish_until_acked()
        burst = len(stack.publisher.acked) - 1
        burst_s = time.monotonic() - back_at
        report = stack.finish()
    finally:
        stack.stop()
    unrecovered = sum(len(s.unrecovered) for s in stack.subs)
    assert report.ok, (
        f"{burst} publishes in {burst_s:.2f} s after Redis came back; {unrecovered} 'recovered: false'; "
        + (report.summary())
    )
    # The point needs the burst's pace: slower, the 100-message history outlasts even the
    # old 2 s backoff and nothing is proved. A slow machine fails here instead of skipping;
    # OFFLOAD_TEST_TIMEOUT_FACTOR stretches the budget (and so loosens the point) knowingly.
    budget = 1.6 * timeout_factor()
    assert burst_s <= budget, (
        f"too slow to make the point: {burst} publishes took {burst_s:.1f} s, more than {budget:.1f} s "
        f"(OFFLOAD_TEST_TIMEOUT_FACTOR={timeout_factor():g})"
    )


# -- pinned: a publish must not run twice -----------------------------------------------------

BUSY_SCRIPT = (
    "local stop = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1]) "
    "while tonumber(redis.call('TIME')[1]) < stop do end return 1"
)


def redis_busy(server: RedisServer) -> bool:
    """Is Redis running a script? It answers nobody meanwhile, not even a PING (then "-BUSY")."""
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(0.1)
        probe.connect(str(server.socket))
        probe.sendall(b"PING\r\n")
        try:
            return not probe.recv(64).startswith(b"+PONG")
        except TimeoutError:
            return True


def test_a_publish_is_published_at_most_once_and_never_after_a_503(tmp_path):
    stack = Stack.start(tmp_path, subscribers=3, channel=f"public:slow-redis-{os.getpid()}", workers=1)
    outcomes = {}
    try:
        for busy in (3, 5):  # seconds Redis is busy (the client timeout is 2 s)
            blocker = threading.Thread(target=lambda b=busy: stack.redis.client().eval(BUSY_SCRIPT, 0, b))
            blocker.start()
            wait_for(lambda: redis_busy(stack.redis), 5, "Redis to run the busy script")
            outcome, _ = stack.publisher.publish_once()
            blocker.join()
            outcomes[busy] = (outcome, stack.publisher.token)
        # Then one more: Redis runs commands in order, so once it is delivered everything
        # published (or queued in Redis during the script) before it has arrived.
        stack.publisher.publish_until_acked()
        wait_caught_up(stack.subs, stack.publisher, 20)
    finally:
        stack.stop()
    delivered = {busy: Counter(stack.subs[0].tokens)[token] for busy, (_, token) in outcomes.items()}
    allowed = {busy: {"acked": {1}, "refused": {0}}.get(outcome, {0, 1}) for busy, (outcome, _) in outcomes.items()}
    assert all(delivered[busy] in allowed[busy] for busy in outcomes), (
        f"Redis busy for 3 s, 5 s: publish outcomes {outcomes}, times each was delivered {delivered}"
    )
