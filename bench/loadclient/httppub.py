"""An HTTP publish client: ``POST /api/publish/<channel>`` spread over many channels.

Publish ``g`` goes to channel ``g % channels`` with body ``{"t": ns, "seq": g}``
(``bench/spread.py``), so the subscribers of ``bench.loadclient.manychannels``
(another process: the publisher's own loop must not delay their timestamps)
can count what arrived. One connection per request (``Connection: close``),
as ``bench/loadclient/fanout.py`` does: the same request against the
project's API and the Channels anchor's publish view.

Config: ``host``, ``port``, ``api_key``, ``channels``, ``channel_prefix``
(default ``public:mc-``), ``timeout`` (per request, s), ``deadline_s``.

Command ``{"cmd": "run", "name", "seconds", "first", "streams" | "rate"}``:
``streams`` closed-loop streams (each sends its next request as soon as the
previous one answered: throughput) or ``rate`` requests/s open loop (a
request every 1/rate s whether or not earlier ones answered). Answers
``started`` when the first request goes out and ``result`` when every
request has answered: ``first``, ``count`` (numbers used), ``ok``,
``failed`` (numbers not answered 200, at most 10,000), ``statuses``,
``seconds`` (first request to last answer), ``publishes_per_s`` (ok /
seconds), ``latency`` (ms: p50/p90/p99/max of each call) and this process's
loop lag. ``{"cmd": "stop"}`` ends the process.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from bench.spread import PREFIX, body, channel_index, channel_name
from bench.stats import summarize_us

from . import http
from .channel import Channel
from .measure import LoopLag, Ticker, Window

MAX_FAILED = 10_000


class HttpPublisher:
    def __init__(self, cfg: dict) -> None:
        self.host, self.port, self.channels = cfg["host"], cfg["port"], cfg["channels"]
        prefix = cfg.get("channel_prefix", PREFIX)
        self.paths = [f"/api/publish/{channel_name(i, prefix)}" for i in range(self.channels)]
        self.headers = {"Authorization": f"Bearer {cfg['api_key']}", "Content-Type": "application/json"}
        self.timeout = float(cfg.get("timeout", 10.0))

    async def run(self, cmd: dict, chan: Channel, lag: LoopLag) -> dict:
        """One run (closed-loop streams or an open-loop rate); the ``result`` fields."""
        first = int(cmd["first"])
        numbers = iter(range(first, first + 10**9))
        latencies: list[int] = []
        statuses: Counter[str] = Counter()
        failed: list[int] = []
        issued = 0
        last_answer = time.monotonic()

        async def publish(_started_ns: int = 0) -> None:
            nonlocal issued, last_answer
            g = next(numbers)
            issued += 1
            path = self.paths[channel_index(g, self.channels)]
            try:
                resp = await http.request(
                    self.host, self.port, "POST", path, headers=self.headers, body=body(g), timeout=self.timeout
                )
                status = str(resp.status)
                if resp.status == 200:
                    latencies.append(resp.elapsed_ns // 1000)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
                status = type(exc).__name__
            except asyncio.CancelledError:  # still pending when the run ended: outcome unknown
                statuses["cancelled"] += 1
                failed.append(g)
                raise
            statuses[status] += 1
            if status != "200" and len(failed) < MAX_FAILED:
                failed.append(g)
            last_answer = time.monotonic()

        async def stream(until: float) -> None:
            while time.monotonic() < until:
                await publish()

        seconds = float(cmd["seconds"])
        window = Window(cmd["name"], time.time_ns())
        started = time.monotonic()
        chan.emit("started", name=cmd["name"])
        ticker = None
        if cmd.get("rate"):
            ticker = Ticker(1 / float(cmd["rate"]), publish)
            tick_task = asyncio.create_task(ticker.run())
            await asyncio.sleep(seconds)
            await ticker.drain(timeout=self.timeout)
            tick_task.cancel()
        else:
            until = started + seconds
            await asyncio.gather(*(stream(until) for _ in range(int(cmd.get("streams") or 1))))
        window.end_ns = time.time_ns()
        took = max(1e-9, last_answer - started)
        ok = statuses.get("200", 0)
        return {
            "name": cmd["name"],
            "first": first,
            "count": issued,
            "ok": ok,
            "failed": failed,
            "statuses": dict(statuses),
            "skipped": ticker.skipped if ticker else 0,
            "seconds": round(took, 3),
            "publishes_per_s": round(ok / took, 1),
            "latency": summarize_us(latencies),
            "client_loop_lag": summarize_us(lag.series.within(window)),
        }


async def run(cfg: dict, chan: Channel) -> None:
    publisher = HttpPublisher(cfg)
    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run())
    chan.emit("ready")
    while True:
        cmd = await chan.next()
        if cmd["cmd"] in ("stop", "eof"):
            break
        if cmd["cmd"] == "run":
            chan.emit("result", **await publisher.run(cmd, chan, lag))
    lag.running = False
    lag_task.cancel()
