"""One publisher run, whoever publishes (stdlib only): HTTP publishes and view probes, ``offload.publish()`` and
``group_send`` are all numbered, paced, timed and reported by :class:`PublishRun`. Open loop (a ``rate``): number
``n`` is due at ``n / rate`` s, so a stalled server shows as latency, not as fewer samples; closed loop: throughput.

Publish ``g`` goes to channel ``g % C`` (its message ``g // C`` there) with data ``{"t": time_ns, "seq": g}``;
subscriber ``i`` listens on channel ``i % C``: a message alone tells which publish it was and whom it was for.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from .stats import summarize_us

MAX_FAILED = 10_000


def names(cfg: dict) -> list[str]:
    """The run's channels: ``[cfg["channel"]]``, or ``cfg["channels"]`` of them named ``public:mc-<i>`` (``public``:
    anyone may subscribe)."""
    return [cfg["channel"]] if cfg.get("channel") else [f"public:mc-{i}" for i in range(int(cfg["channels"]))]


def stamp(g: int, size: int = 0) -> bytes:
    """The data of publish ``g``: compact JSON, ``t`` and ``seq`` first (what :func:`parse_stamp` reads)."""
    head = b'{"t":%d,"seq":%d' % (time.time_ns(), g)
    if size <= len(head) + 1:
        return head + b"}"
    return head + b',"p":"' + b"x" * max(0, size - len(head) - 8) + b'"}'


def parse_stamp(raw: bytes) -> tuple[int, int]:
    """``(t, seq)`` of a stamp from its first bytes, without a JSON parser (much cheaper per delivery)."""
    comma = raw.find(b',"seq":', 0, 64)
    if not raw.startswith(b'{"t":') or comma < 0:
        data = json.loads(raw)
        return data["t"], data["seq"]
    end = raw.find(b",", comma + 7, comma + 40)
    return int(raw[5:comma]), int(raw[comma + 7 : end if end > 0 else -1])


def expected(ranges: list[dict], channels: int) -> list[list[int]]:
    """Per channel, the per-channel numbers of the publishes in ``ranges`` (``first``, ``count``,
    ``failed``) that did not fail: what each of the channel's subscribers must receive exactly once."""
    out: list[list[int]] = [[] for _ in range(channels)]
    for r in ranges:
        skip = set(r.get("failed") or ())
        for g in range(r["first"], r["first"] + r["count"]):
            if g not in skip:
                out[g % channels].append(g // channels)
    return out


class PublishRun:
    """Numbers, schedule and outcome of one run: ``records`` holds ``(g, t_ns, error, us)`` per call."""

    def __init__(self, first: int = 0, seconds: float | None = None, rate: float | None = None, count: int = 0) -> None:
        self.first, self.next, self.rate, self.last = first, first, rate, first + count if count else math.inf
        self.started = self.last_return = time.monotonic()
        self.until = self.started + seconds if seconds else math.inf
        self.stopped = False
        self.records: list[tuple[int, int, str | None, int]] = []
        self._lock = threading.Lock()  # OS threads share one run

    def take(self) -> tuple[int, float] | None:
        """The next number and the seconds to wait until it is due; None once the run is over."""
        with self._lock:
            now = time.monotonic()
            due = self.started + (self.next - self.first) / self.rate if self.rate else now
            if self.stopped or max(due, now) >= self.until or self.next >= self.last:
                return None
            self.next += 1
            return self.next - 1, max(0.0, due - now)

    def done(self, g: int, t_ns: int, started_ns: int, error: str | None) -> None:
        self.records.append((g, t_ns, error, (time.perf_counter_ns() - started_ns) // 1000))
        self.last_return = time.monotonic()

    def result(self) -> dict:
        """``first``, ``count`` (numbers taken), ``failed`` (taken but not published), ``errors``,
        ``seconds`` (start to last return), ``publishes_per_s`` and call ``latency`` (ms)."""
        ok = {g: us for g, _, error, us in self.records if error is None}
        errors = Counter(error for _, _, error, _ in self.records if error is not None)
        count = self.next - self.first
        if count > len(self.records):
            errors["unanswered"] += count - len(self.records)
        took = max(1e-9, self.last_return - self.started)
        out = {"first": self.first, "count": count, "ok": len(ok), "errors": dict(errors), "seconds": round(took, 3)}
        out["failed"] = [g for g in range(self.first, self.next) if g not in ok][:MAX_FAILED]
        return {**out, "publishes_per_s": round(len(ok) / took, 1), "latency": summarize_us(ok.values())}


def run_threads(run: PublishRun, call: Callable[[int], object], callers: int) -> None:
    """``callers`` threads (greenlets, once gevent patched ``threading``) calling ``call(g)``; a call fails by raising
    (what it returns is ignored: ``offload.publish()`` returns the message id, ``presence_count()`` the count)."""

    def caller() -> None:
        while (taken := run.take()) is not None:
            g, wait = taken
            time.sleep(wait)  # sleep(0) too: under gevent a greenlet yields between calls, as a view does
            t, started, error = time.time_ns(), time.perf_counter_ns(), None
            try:
                call(g)
            except Exception as exc:  # BackendUnavailable, OutcomeUnknown, ...
                error = type(exc).__name__
            run.done(g, t, started, error)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


async def drive(run: PublishRun, call: Callable[[int], Awaitable[str | None]], callers: int) -> None:
    """The asyncio form of :func:`run_threads`; a call cancelled in flight counts as unanswered."""

    async def caller() -> None:
        while (taken := run.take()) is not None:
            g, wait = taken
            await asyncio.sleep(wait)
            t, started = time.time_ns(), time.perf_counter_ns()
            try:
                error = await call(g)
            except Exception as exc:  # network errors, timeouts, a channel layer's own errors
                error = type(exc).__name__
            run.done(g, t, started, error)

    await asyncio.gather(*(caller() for _ in range(callers)))


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def ready_then_go() -> None:
    """Say ``ready``, then wait for the orchestrator's ``go`` (it opens its measuring window first)."""
    emit("ready")
    if not sys.stdin.readline():
        sys.exit("stdin closed before go: the orchestrator is gone")


def finish(run: PublishRun) -> None:
    """Print the result, then wait for EOF: the orchestrator reads our CPU time before we exit."""
    emit("result", **run.result())
    sys.stdin.read()
