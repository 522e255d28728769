"""The measuring client, against ours and every anchor alike: websocket subscribers, plus the HTTP publisher and the
view probe when asked (numbering: ``bench/publoop.py``; commands: :meth:`Client.handle` and :func:`run`)."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter
from dataclasses import dataclass

from bench.publoop import PublishRun, drive, expected, names, parse_stamp, stamp
from bench.stats import summarize_us

from . import http
from .ws import SubscriberPool

CDF_POINTS = 200
OPEN_LOOP_CALLERS = 200  # requests in flight at most in an open-loop run


@dataclass
class Window:
    """A sample belongs to the window its *request* started in (publish time, a probe's send time), not the one it
    ended in: a delivery delayed past the end counts against the window that caused it."""

    name: str
    start_ns: int
    end_ns: int | None = None

    def holds(self, t_ns: int) -> bool:
        return self.start_ns <= t_ns and (self.end_ns is None or t_ns < self.end_ns)


class Series:
    """(started_ns, value in µs) samples, picked by window."""

    def __init__(self, pairs=()) -> None:
        self.t: list[int] = [t for t, _ in pairs]
        self.v: list[int] = [v for _, v in pairs]

    def add(self, started_ns: int, value: int) -> None:
        self.t.append(started_ns)
        self.v.append(value)

    def pairs(self, window: Window) -> list[tuple[int, int]]:
        return [(t, v) for t, v in zip(self.t, self.v, strict=True) if window.holds(t)]

    def within(self, window: Window) -> list[int]:
        return [v for _, v in self.pairs(window)]

    def slowest(self, window: Window) -> list[int]:
        """The slowest delivery of each publish (they share its ``t``): how long one took to reach all."""
        worst: dict[int, int] = {}
        for t, v in self.pairs(window):
            worst[t] = max(v, worst.get(t, 0))
        return list(worst.values())

    def timeline(self, window: Window) -> list[list[float]]:
        """``[second of the window, p50, p99, n]`` per second of start time (for the plots)."""
        buckets: dict[int, list[int]] = {}
        for t, v in self.pairs(window):
            buckets.setdefault((t - window.start_ns) // 1_000_000_000, []).append(v)
        return [[k, *(summarize_us(buckets[k])[q] for q in ("p50", "p99")), len(buckets[k])] for k in sorted(buckets)]


class Ledger:
    """How often each subscriber got each of its channel's messages (by the channel's own numbering,
    ``bench/publoop.py``): lost and duplicate deliveries, in total and of the worst subscriber."""

    def __init__(self, subscribers: int, channels: int) -> None:
        self.channels = channels
        self.counts = [bytearray() for _ in range(subscribers)]
        self.misrouted = 0  # deliveries of another channel's message

    def record(self, index: int, g: int) -> None:
        if g % self.channels != index % self.channels:
            self.misrouted += 1
            return
        slot, counts = g // self.channels, self.counts[index]
        if slot >= len(counts):
            counts.extend(bytes(slot + 1024 - len(counts)))
        if counts[slot] < 255:
            counts[slot] += 1

    def tally(self, per_channel: list[list[int]]) -> dict:
        out = dict.fromkeys(("expected", "lost", "dup", "max_lost_per_subscriber", "max_dup_per_subscriber"), 0)
        for index, counts in enumerate(self.counts):
            slots, size, lost, dup = per_channel[index % self.channels], len(counts), 0, 0
            for slot in slots:
                c = counts[slot] if slot < size else 0
                lost += c == 0
                dup += max(0, c - 1)
            out["expected"] += len(slots)
            out["lost"], out["dup"] = out["lost"] + lost, out["dup"] + dup
            out["max_lost_per_subscriber"] = max(out["max_lost_per_subscriber"], lost)
            out["max_dup_per_subscriber"] = max(out["max_dup_per_subscriber"], dup)
        return out


class Client:
    """The subscribers of one process, what they received, and this process's own publishes and probes."""

    def __init__(self, cfg: dict, chan) -> None:
        self.cfg, self.chan, self.names = cfg, chan, names(cfg)
        n, host, port = cfg["subscribers"], cfg["host"], cfg["port"]
        self.ledger, self.latency, self.arrivals = Ledger(n, len(self.names)), Series(), []
        url = f"ws://{host}:{port}{cfg.get('ws_path', '/ws/?')}channel="
        extra = "".join(f"&channel=public:extra-{j}" for j in range(int(cfg.get("extra_channels", 0))))
        self.pool = SubscriberPool(lambda i: url + self.names[i % len(self.names)] + extra, n, self.on_data)
        self.headers = {"Authorization": f"Bearer {cfg.get('api_key')}", "Content-Type": "application/json"}
        self.windows: dict[str, Window] = {}
        self.expects: dict[str, list[dict]] = {}
        self.runs: list[PublishRun] = []  # this process's HTTP publish runs
        self.probe: PublishRun | None = None
        self.lag = Series()  # how late this process's own event loop wakes up: a client-bound run shows here
        self.tasks: list[asyncio.Task] = []

    async def measure_lag(self, period: float = 0.05) -> None:
        while True:
            before, started = time.perf_counter_ns(), time.time_ns()
            await asyncio.sleep(period)
            self.lag.add(started, max(0, (time.perf_counter_ns() - before) // 1000 - int(period * 1e6)))

    def on_data(self, index: int, raw: bytes, received_ns: int) -> None:
        t, g = parse_stamp(raw)
        self.ledger.record(index, g)
        self.latency.add(t, (received_ns - t) // 1000)
        self.arrivals.append(received_ns)

    async def post(self, g: int) -> str | None:
        cfg, path = self.cfg, f"/api/publish/{self.names[g % len(self.names)]}"
        body = stamp(g, int(cfg.get("payload", 0)))
        status, _, _ = await http.request(cfg["host"], cfg["port"], "POST", path, headers=self.headers, body=body)
        return None if status == 200 else str(status)

    async def get_view(self, _g: int) -> str | None:
        status, _, _ = await http.request(self.cfg["host"], self.cfg["port"], "GET", self.cfg["probe_path"])
        return None if status == 200 else str(status)

    async def publish(self, cmd: dict) -> None:
        run = PublishRun(int(cmd.get("first", 0)), cmd.get("seconds"), cmd.get("rate"))
        self.runs.append(run)
        await drive(run, self.post, int(cmd.get("streams") or OPEN_LOOP_CALLERS))
        if cmd.get("seconds"):
            self.chan.emit("published", **run.result())

    def own(self, w: Window) -> dict | None:
        """This process's publishes that started in ``w``: ``first``, ``count``, ``failed``, call latency."""
        records = [r for run in self.runs for r in run.records if w.holds(r[1])]
        if not records:
            return None
        gs = [r[0] for r in records]
        ok = {g for g, _, error, _ in records if error is None}
        out = {"first": min(gs), "count": max(gs) - min(gs) + 1, "errors": dict(Counter(r[2] for r in records if r[2]))}
        out["failed"] = [g for g in range(min(gs), max(gs) + 1) if g not in ok]
        return {**out, "latency": summarize_us(us for *_, e, us in records if e is None)}

    def handle(self, cmd: dict) -> None:
        kind, name = cmd["cmd"], cmd.get("name")
        if kind == "open":
            self.windows[name] = Window(name, time.time_ns())
            self.chan.emit("opened", name=name)
        elif kind == "close":
            self.windows[name].end_ns = time.time_ns()
            self.chan.emit("closed", name=name, open_sockets=self.pool.open_count(), own=self.own(self.windows[name]))
        elif kind == "publish":
            self.tasks.append(asyncio.create_task(self.publish(cmd)))
        elif kind == "expect":
            self.expects.setdefault(name, []).append(cmd)
        elif kind == "ping":  # answered only once the loop got round to it: a backlog shows
            due = expected([e for es in self.expects.values() for e in es], len(self.names))
            subs_on = [len(range(c, self.pool.n, len(self.names))) for c in range(len(self.names))]
            expected_ = sum(len(s) * subs_on[c] for c, s in enumerate(due))
            self.chan.emit("pong", arrivals=len(self.arrivals), expected=expected_)

    def figures(self, w: Window) -> dict:
        """Everything measured in one window."""
        seconds, own = (w.end_ns - w.start_ns) / 1e9, self.own(w)
        ranges = self.expects.get(w.name, [])  # this process's own publishes too: told like any other
        b = summarize_us(self.latency.within(w), CDF_POINTS)
        b.update(self.ledger.tally(expected(ranges, len(self.names))))
        arrived = bisect.bisect_left(self.arrivals, w.end_ns) - bisect.bisect_left(self.arrivals, w.start_ns)
        b.update(arrived_in_window=arrived, deliveries_per_s=round(arrived / seconds, 1))
        b["timeline"] = self.latency.timeline(w)
        b.update(expected_per_s=round(b["expected"] / seconds, 1), all_reached=summarize_us(self.latency.slowest(w)))
        b["publishes"] = sum(r["count"] - len(r["failed"]) for r in ranges)
        closes = [code for t, _, code in self.pool.disconnects if w.holds(t)]
        out = {"seconds": round(seconds, 2), "start_ns": w.start_ns, "end_ns": w.end_ns, "broadcast": b}
        out["publish"] = {**own["latency"], "failed": own["errors"]} if own else summarize_us([])
        out["client_loop_lag"] = summarize_us(self.lag.within(w))
        out["disconnects"] = {"count": len(closes), "codes": dict(Counter(str(c) for c in closes))}
        if self.probe is not None:
            views = Series([(t, us) for _, t, error, us in self.probe.records if error is None])
            failed = Counter(str(e) for _, t, e, _ in self.probe.records if e and w.holds(t))
            out["view"] = {**summarize_us(views.within(w), CDF_POINTS), "failed": dict(failed)}
            out["view"]["timeline"] = views.timeline(w)
        return out


async def run(cfg: dict, chan) -> None:
    client = Client(cfg, chan)
    if cfg.get("start_at_ns"):  # connect storms: several processes start together
        await asyncio.sleep(max(0.0, (cfg["start_at_ns"] - time.time_ns()) / 1e9))
    connect_s = await client.pool.connect(cfg.get("connect_concurrency", 100), cfg.get("connect_timeout", 5.0))
    errors, connect_us = dict(client.pool.errors), client.pool.connect_us
    chan.emit("ready", connect_s=round(connect_s, 3), connect_errors=errors, connect_us=connect_us)
    client.tasks.append(asyncio.create_task(client.measure_lag()))
    if cfg.get("probe_path"):
        client.probe = PublishRun(rate=1000 / cfg["probe_ms"])
        client.tasks.append(asyncio.create_task(drive(client.probe, client.get_view, OPEN_LOOP_CALLERS)))
    while (cmd := await chan.next())["cmd"] not in ("stop", "eof"):
        client.handle(cmd)
    for run_ in filter(None, [*client.runs, client.probe]):
        run_.stopped = True
    await asyncio.sleep(float(cfg.get("drain_s", 2.0)))  # deliveries of the last publishes
    for task in client.tasks:
        task.cancel()
    await asyncio.gather(*client.tasks, return_exceptions=True)
    client.arrivals.sort()
    windows = {name: client.figures(w) for name, w in client.windows.items() if w.end_ns}
    errors, gone, misrouted = dict(client.pool.errors), len(client.pool.disconnects), client.ledger.misrouted
    chan.emit("summary", windows=windows, misrouted=misrouted, subscribe_errors=errors, disconnects=gone)
    await client.pool.close()
