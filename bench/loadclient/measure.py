"""Measuring tools: windows on publish time, a delivery ledger, open-loop tickers.

* A sample belongs to the window in which its *request* started (publish
  time for broadcasts, send time for view probes), not to the one in which
  it finished: a delivery delayed past the window's end still counts against
  the window that caused it.
* Tickers are open-loop (a request every period whether or not the previous
  one finished), so a stalled server shows as high latency instead of fewer
  samples (no coordinated omission); a cap on outstanding requests keeps them
  bounded.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Window:
    name: str
    start_ns: int
    end_ns: int | None = None

    def holds(self, t_ns: int) -> bool:
        return self.start_ns <= t_ns and (self.end_ns is None or t_ns < self.end_ns)


class Series:
    """(started_ns, value) samples; ``within(window)`` picks a window's values."""

    def __init__(self) -> None:
        self.t: list[int] = []
        self.v: list[int] = []

    def add(self, started_ns: int, value: int) -> None:
        self.t.append(started_ns)
        self.v.append(value)

    def within(self, window: Window) -> list[int]:
        return [v for t, v in zip(self.t, self.v, strict=True) if window.holds(t)]

    def timeline(self, window: Window, bucket_s: float = 1.0) -> list[tuple[float, list[int]]]:
        """Samples grouped by ``bucket_s`` of start time from the window's start."""
        buckets: dict[int, list[int]] = {}
        for t, v in zip(self.t, self.v, strict=True):
            if window.holds(t):
                buckets.setdefault(int((t - window.start_ns) / 1e9 / bucket_s), []).append(v)
        return [(k * bucket_s, buckets[k]) for k in sorted(buckets)]


class Ledger:
    """How many times each subscriber got each sequence number (lost / duplicate)."""

    def __init__(self, subscribers: int) -> None:
        self.counts = [bytearray() for _ in range(subscribers)]

    def record(self, index: int, seq: int) -> None:
        counts = self.counts[index]
        if seq >= len(counts):
            counts.extend(bytes(seq + 1024 - len(counts)))
        if counts[seq] < 255:
            counts[seq] += 1

    def tally(self, seqs: list[int]) -> dict:
        """Lost and duplicate deliveries of ``seqs`` over all subscribers."""
        lost = dup = 0
        for counts in self.counts:
            size = len(counts)
            for seq in seqs:
                c = counts[seq] if seq < size else 0
                if c == 0:
                    lost += 1
                elif c > 1:
                    dup += c - 1
        return {"expected": len(seqs) * len(self.counts), "lost": lost, "dup": dup}


@dataclass
class Ticker:
    """Run ``action(started_ns)`` every ``period`` seconds, open-loop, until stopped."""

    period: float
    action: Callable[[int], Awaitable[None]]
    max_outstanding: int = 200
    skipped: int = 0
    outstanding: set = field(default_factory=set)
    running: bool = True

    async def run(self) -> None:
        next_at = time.monotonic()
        while self.running:
            if len(self.outstanding) < self.max_outstanding:
                task = asyncio.create_task(self.action(time.time_ns()))
                self.outstanding.add(task)
                task.add_done_callback(self.outstanding.discard)
            else:
                self.skipped += 1
            next_at += self.period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def drain(self, timeout: float) -> None:
        """Stop ticking and give requests in flight ``timeout`` s to finish."""
        self.running = False
        if self.outstanding:
            _, pending = await asyncio.wait(set(self.outstanding), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                print(f"{len(pending)} requests still pending after {timeout} s: cancelled", file=sys.stderr)


class LoopLag:
    """How late this process's own event loop wakes up (client-side delay)."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.series = Series()
        self.running = True

    async def run(self) -> None:
        while self.running:
            before = time.perf_counter_ns()
            started = time.time_ns()
            await asyncio.sleep(self.period)
            late_us = (time.perf_counter_ns() - before) // 1000 - int(self.period * 1e6)
            self.series.add(started, max(0, late_us))
