"""Measuring tools of the load clients: windows on publish time, series, a delivery ledger, loop lag.

A sample belongs to the window in which its *request* started (publish time
for deliveries, send time for view probes), not the one in which it ended:
a delivery delayed past the window's end still counts against the window
that caused it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.stats import summarize_us


@dataclass
class Window:
    name: str
    start_ns: int
    end_ns: int | None = None

    def holds(self, t_ns: int) -> bool:
        return self.start_ns <= t_ns and (self.end_ns is None or t_ns < self.end_ns)


class Series:
    """(started_ns, value in µs) samples, picked by window."""

    def __init__(self) -> None:
        self.t: list[int] = []
        self.v: list[int] = []

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
    ``bench/spread.py``): lost and duplicate deliveries, in total and of the worst subscriber."""

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
        out.update(subscribers_with_loss=0, subscribers_with_dup=0)
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
            out["subscribers_with_loss"] += lost > 0
            out["subscribers_with_dup"] += dup > 0
        return out


class LoopLag:
    """How late this process's own event loop wakes up: a client-bound run shows here."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.series = Series()

    async def run(self) -> None:
        while True:
            before, started = time.perf_counter_ns(), time.time_ns()
            await asyncio.sleep(self.period)
            self.series.add(started, max(0, (time.perf_counter_ns() - before) // 1000 - int(self.period * 1e6)))
