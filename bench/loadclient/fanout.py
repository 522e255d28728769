"""The fan-out client: N subscribers on one channel, windows at a given publish load.

Works against the project and against the Channels anchor (same protocol).
Commands from the orchestrator:

* ``{"cmd": "window", "name", "seconds", "rate", "streams"}``: publish
  through the HTTP API at ``rate``/s (open loop) and/or in ``streams``
  closed-loop streams (next request as soon as the previous answered), and
  measure for ``seconds``. An external publisher (``bench/redis_publisher.py``)
  may publish meanwhile with ``seq >= EXTERNAL_BASE``.
* ``{"cmd": "external", "name", "first", "count"}``: the external publisher's
  seqs attributed to a window (for lost/duplicate counts).
* ``{"cmd": "expect", "name", "seqs"}``: the HTTP seqs another client process
  published in a window (``published_ok`` of its ``window_ended``), for a
  subscriber-only process; a process with ``subscribers: 0`` is a light
  publish probe whose API timings no subscriber load can delay.
* ``{"cmd": "stop"}``: report every window (``summary``) and close.

Per window: latency of every delivery whose publish time is in the window,
deliveries/s by *arrival* time in the window (what saturation runs want),
lost/duplicate per subscriber, publish API latency, this process's loop lag.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter

from bench.stats import summarize_us

from . import http
from .channel import Channel
from .measure import Ledger, LoopLag, Series, Ticker, Window
from .probe import CDF_POINTS, parse_stamp, stamp
from .ws import SubscriberPool

#: seqs of the external (Redis) publisher start here; the client's own start at 0
EXTERNAL_BASE = 1_000_000


async def run(cfg: dict, chan: Channel) -> None:
    host, port, n = cfg["host"], cfg["port"], cfg["subscribers"]
    own, external = Ledger(n), Ledger(n)
    latency = Series()  # (publish t, latency us) per delivery
    arrivals: list[int] = []  # arrival ns of every delivery (counted per window)
    last: dict[int, int] = {}  # own seq -> latency of its slowest delivery, us (one broadcast reaching all)

    def on_data(index: int, raw: bytes, received_ns: int) -> None:
        t, seq = parse_stamp(raw)
        if seq >= EXTERNAL_BASE:
            external.record(index, seq - EXTERNAL_BASE)
            us = (received_ns - t) // 1000
        else:
            own.record(index, seq)
            us = (received_ns - t) // 1000
            if us > last.get(seq, -1):
                last[seq] = us
        latency.add(t, us)
        arrivals.append(received_ns)

    pool = SubscriberPool(f"ws://{host}:{port}/ws/?channel={cfg['channel']}", n, on_data, raw=True)
    if cfg.get("start_at_ns"):  # connect storms: several processes start together
        await asyncio.sleep(max(0.0, (cfg["start_at_ns"] - time.time_ns()) / 1e9))
    connect_s = await pool.connect(cfg["connect_concurrency"], timeout=cfg.get("connect_timeout", 5.0))
    chan.emit("ready", subscribers=n, connect_s=round(connect_s, 3), connect_errors=dict(pool.errors))

    published: dict[int, tuple[int, int | str]] = {}  # own seq -> (t, status or error)
    publish_series = Series()
    headers = {"Authorization": f"Bearer {cfg['api_key']}", "Content-Type": "application/json"}
    seq_counter = iter(range(EXTERNAL_BASE))

    async def publish(_started_ns: int = 0) -> None:
        seq = next(seq_counter)
        body = stamp(seq)
        t, _ = parse_stamp(body)
        try:
            resp = await http.request(host, port, "POST", f"/api/publish/{cfg['channel']}", headers=headers, body=body)
            published[seq] = (t, resp.status)
            publish_series.add(t, resp.elapsed_ns // 1000)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            published[seq] = (t, type(exc).__name__)

    async def stream(until: float) -> None:
        while time.monotonic() < until:
            await publish()

    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run())
    windows: list[tuple[Window, dict]] = []
    external_seqs: dict[str, list[int]] = {}
    expected_own: dict[str, list[int]] = {}  # seqs a probe process published (we publish none)
    while True:
        cmd = await chan.next()
        if cmd["cmd"] == "window":
            seconds = float(cmd["seconds"])
            window = Window(cmd["name"], time.time_ns())
            until = time.monotonic() + seconds
            tasks = []
            ticker = None
            if cmd.get("rate"):
                ticker = Ticker(1 / float(cmd["rate"]), publish)
                tasks.append(asyncio.create_task(ticker.run()))
            tasks += [asyncio.create_task(stream(until)) for _ in range(int(cmd.get("streams") or 0))]
            chan.emit("window_started", name=window.name)
            await asyncio.sleep(seconds)
            window.end_ns = time.time_ns()
            if ticker is not None:
                await ticker.drain(timeout=5)
            await asyncio.gather(*tasks, return_exceptions=True)
            windows.append((window, cmd))
            sent = [seq for seq, (t, status) in published.items() if window.holds(t) and status == 200]
            chan.emit("window_ended", name=window.name, open_sockets=pool.open_count(), published_ok=sent)
        elif cmd["cmd"] == "ping":  # answered only once the loop got round to it: a backlog shows
            chan.emit("pong", arrivals=len(arrivals))
        elif cmd["cmd"] == "external":
            external_seqs[cmd["name"]] = list(range(cmd["first"], cmd["first"] + cmd["count"]))
        elif cmd["cmd"] == "expect":
            expected_own[cmd["name"]] = list(cmd["seqs"])
        elif cmd["cmd"] in ("stop", "eof"):
            break

    await asyncio.sleep(float(cfg.get("drain_s", 2.0)))  # deliveries of the last publishes
    lag.running = False
    lag_task.cancel()

    arrivals.sort()
    results = {}
    for w, cmd in windows:
        seconds = (w.end_ns - w.start_ns) / 1e9
        ok = [seq for seq, (t, status) in published.items() if w.holds(t) and status == 200]
        ok = ok or expected_own.get(w.name, [])
        failed = Counter(str(status) for seq, (t, status) in published.items() if w.holds(t) and status != 200)
        b = summarize_us(latency.within(w), CDF_POINTS)
        tally = own.tally(ok)
        ext = external.tally(external_seqs.get(w.name, []))
        b.update({k: tally[k] + ext[k] for k in ("expected", "lost", "dup")})
        lo = bisect.bisect_left(arrivals, w.start_ns)
        hi = bisect.bisect_left(arrivals, w.end_ns)
        b["arrived_in_window"] = hi - lo
        b["deliveries_per_s"] = round((hi - lo) / seconds, 1)
        b["publishes_ok"] = len(ok) + len(external_seqs.get(w.name, []))
        b["all_reached"] = summarize_us([last[seq] for seq in ok if seq in last])
        p = summarize_us(publish_series.within(w))
        p["failed"] = dict(failed)
        closes = [code for t, _, code in pool.disconnects if w.holds(t)]
        results[w.name] = {
            "seconds": round(seconds, 2),
            "start_ns": w.start_ns,
            "end_ns": w.end_ns,
            "rate": cmd.get("rate"),
            "streams": cmd.get("streams"),
            "broadcast": b,
            "publish": p,
            "client_loop_lag": summarize_us(lag.series.within(w)),
            "disconnects": {"count": len(closes), "codes": dict(Counter(str(c) for c in closes))},
        }
    chan.emit("summary", windows=results, subscribe_errors=dict(pool.errors), disconnects=len(pool.disconnects))
    await pool.close()
