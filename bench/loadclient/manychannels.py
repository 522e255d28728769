"""Subscribers spread over many channels, measuring what arrives (no publishing).

Subscriber ``i`` opens ``/ws/?channel=<prefix><i % channels>`` (the
numbering of ``bench/spread.py``); publishers elsewhere (the Redis publisher,
``offload.publish()`` in a process, an HTTP publish client, Channels'
``group_send``) send ``{"t": ns, "seq": g}`` to channel ``g % channels``.
Works against the project and against the Channels anchor (same protocol).

Config: ``host``, ``port``, ``subscribers``, ``channels``, ``channel_prefix``
(default ``public:mc-``), ``connect_concurrency``, ``connect_timeout``,
``drain_s``, ``deadline_s``.

Commands from the orchestrator:

* ``{"cmd": "open", "name"}`` / ``{"cmd": "close", "name"}``: a measuring
  window, as long as the orchestrator keeps it open (it brackets one
  publisher's run); ``window_open`` / ``window_closed`` answer;
* ``{"cmd": "expect", "name", "first", "count", "failed"}``: the publishes
  of that window (numbers ``first .. first+count-1`` minus ``failed``), for
  lost/duplicate counts;
* ``{"cmd": "ping"}``: ``pong`` with the number of deliveries so far (a
  backlog still arriving shows as a growing count) and the number expected
  so far (from every ``expect``);
* ``{"cmd": "stop"}``: wait ``drain_s`` for late deliveries, report every
  window (``summary``) and close.

Per window: latency of every delivery whose publish time ``t`` lies in the
window, deliveries/s by arrival inside it, lost/duplicate deliveries per
subscriber (total, worst subscriber, subscribers affected), deliveries that
reached a subscriber of another channel ("misrouted"), this process's loop
lag, and websockets closed by the server.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter

from bench.spread import PREFIX, channel_name, expected
from bench.stats import summarize_us

from .channel import Channel
from .measure import LoopLag, Series, Window
from .probe import CDF_POINTS, parse_stamp
from .ws import SubscriberPool


class SpreadLedger:
    """How often each subscriber got each of its channel's messages (by per-channel number)."""

    def __init__(self, subscribers: int, channels: int) -> None:
        self.channels = channels
        self.counts = [bytearray() for _ in range(subscribers)]
        self.misrouted = 0

    def record(self, index: int, g: int) -> None:
        if g % self.channels != index % self.channels:
            self.misrouted += 1
            return
        slot = g // self.channels
        counts = self.counts[index]
        if slot >= len(counts):
            counts.extend(bytes(slot + 64 - len(counts)))
        if counts[slot] < 255:
            counts[slot] += 1

    def tally(self, per_channel: list[list[int]]) -> dict:
        """Lost/duplicate of the expected per-channel numbers, over all subscribers and per subscriber."""
        lost = dup = worst_lost = worst_dup = with_loss = with_dup = expected_total = 0
        for index, counts in enumerate(self.counts):
            slots = per_channel[index % self.channels]
            expected_total += len(slots)
            size = len(counts)
            sub_lost = sub_dup = 0
            for slot in slots:
                c = counts[slot] if slot < size else 0
                if c == 0:
                    sub_lost += 1
                elif c > 1:
                    sub_dup += c - 1
            lost += sub_lost
            dup += sub_dup
            worst_lost = max(worst_lost, sub_lost)
            worst_dup = max(worst_dup, sub_dup)
            with_loss += sub_lost > 0
            with_dup += sub_dup > 0
        return {
            "expected": expected_total,
            "lost": lost,
            "dup": dup,
            "max_lost_per_subscriber": worst_lost,
            "max_dup_per_subscriber": worst_dup,
            "subscribers_with_loss": with_loss,
            "subscribers_with_dup": with_dup,
        }


async def run(cfg: dict, chan: Channel) -> None:
    host, port, n, channels = cfg["host"], cfg["port"], cfg["subscribers"], cfg["channels"]
    prefix = cfg.get("channel_prefix", PREFIX)
    ledger = SpreadLedger(n, channels)
    latency = Series()  # (publish t, latency us) per delivery
    arrivals: list[int] = []  # arrival ns of every delivery

    def on_data(index: int, raw: bytes, received_ns: int) -> None:
        t, g = parse_stamp(raw)
        ledger.record(index, g)
        latency.add(t, (received_ns - t) // 1000)
        arrivals.append(received_ns)

    def url(index: int) -> str:
        return f"ws://{host}:{port}/ws/?channel={channel_name(index % channels, prefix)}"

    pool = SubscriberPool(url, n, on_data, raw=True)
    connect_s = await pool.connect(cfg.get("connect_concurrency", 200), timeout=cfg.get("connect_timeout", 10.0))
    chan.emit(
        "ready", subscribers=n, channels=channels, connect_s=round(connect_s, 3), connect_errors=dict(pool.errors)
    )

    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run())
    windows: dict[str, Window] = {}
    expects: dict[str, dict] = {}
    subs_on = [len(range(c, n, channels)) for c in range(channels)]  # subscribers per channel
    due = 0  # deliveries expected so far (all windows told by "expect")
    while True:
        cmd = await chan.next()
        kind = cmd["cmd"]
        if kind == "open":
            windows[cmd["name"]] = Window(cmd["name"], time.time_ns())
            chan.emit("window_open", name=cmd["name"])
        elif kind == "close":
            windows[cmd["name"]].end_ns = time.time_ns()
            chan.emit("window_closed", name=cmd["name"], open_sockets=pool.open_count(), arrivals=len(arrivals))
        elif kind == "expect":
            expects[cmd["name"]] = cmd
            slots = expected(cmd["first"], cmd["count"], channels, cmd.get("failed") or ())
            due += sum(len(s) * subs_on[c] for c, s in enumerate(slots))
        elif kind == "ping":  # answered only once the loop got round to it: a backlog shows
            chan.emit("pong", arrivals=len(arrivals), expected=due)
        elif kind in ("stop", "eof"):
            break

    await asyncio.sleep(float(cfg.get("drain_s", 2.0)))  # deliveries of the last publishes
    lag.running = False
    lag_task.cancel()

    arrivals.sort()
    results = {}
    for name, w in windows.items():
        if w.end_ns is None:
            w.end_ns = time.time_ns()
        seconds = (w.end_ns - w.start_ns) / 1e9
        b = summarize_us(latency.within(w), CDF_POINTS)
        e = expects.get(name)
        if e is not None:
            b.update(ledger.tally(expected(e["first"], e["count"], channels, e.get("failed") or ())))
            b["publishes"] = e["count"] - len(e.get("failed") or ())
        lo = bisect.bisect_left(arrivals, w.start_ns)
        hi = bisect.bisect_left(arrivals, w.end_ns)
        b["arrived_in_window"] = hi - lo
        b["deliveries_per_s"] = round((hi - lo) / seconds, 1) if seconds > 0 else None
        closes = [code for t, _, code in pool.disconnects if w.holds(t)]
        results[name] = {
            "seconds": round(seconds, 2),
            "start_ns": w.start_ns,
            "end_ns": w.end_ns,
            "broadcast": b,
            "client_loop_lag": summarize_us(lag.series.within(w)),
            "disconnects": {"count": len(closes), "codes": dict(Counter(str(c) for c in closes))},
        }
    chan.emit(
        "summary",
        windows=results,
        misrouted=ledger.misrouted,
        subscribe_errors=dict(pool.errors),
        disconnects=len(pool.disconnects),
    )
    await pool.close()
