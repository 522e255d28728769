"""Soak run: a publisher and reconnecting subscribers through repeated faults.

    .venv/bin/python tests/soak_run.py        # or: make soak

Starts its own redis-server and uWSGI (loopback, temporary directory), then
for ``SOAK_SECONDS`` publishes continuously through the HTTP API while
``SOAK_SUBSCRIBERS`` websocket subscribers stay subscribed (reconnecting with
``since=<last id>`` like offload.js). Every ``SOAK_FAULT_EVERY`` seconds it
injects the next fault, in turn: a Redis stop/start, a graceful reload
(SIGHUP), a worker SIGKILL. At the end it checks that every subscriber
received every acknowledged id after its first subscription, in order,
exactly once, prints a summary (publishes, deliveries per subscriber, gaps,
duplicates, fault measurements, worker RSS over time) and stops everything.

Settings (environment): SOAK_SECONDS (300), SOAK_SUBSCRIBERS (100),
SOAK_WORKERS (2), SOAK_FAULT_EVERY (20), SOAK_INTERVAL_MS ("10-20": delay
between publishes), SOAK_CHANNEL ("room:soak", or e.g. "public:soak":
anonymous sockets, 100 messages of history).

Exit status: 0 when all is well; 1 on any gap, duplicate, unexpected or
out-of-order delivery; 2 when a fault broke one of its own promises (publish
not failing fast with 503, a socket not closed with 1012, a Traceback in the
log, ...) or the run could not complete.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import traceback
from itertools import cycle
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.test_resilience import Stack, check_log, rss_mb, worker_pids  # noqa: E402

# pytest collects only test_*.py: this script is never collected.


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def main() -> int:
    seconds = env_float("SOAK_SECONDS", 300)
    subscribers = int(env_float("SOAK_SUBSCRIBERS", 100))
    workers = int(env_float("SOAK_WORKERS", 2))
    fault_every = env_float("SOAK_FAULT_EVERY", 20)
    low, _, high = os.environ.get("SOAK_INTERVAL_MS", "10-20").partition("-")
    interval = (float(low) / 1000, float(high or low) / 1000)
    print(
        f"soak: {seconds:.0f} s, {subscribers} subscribers, {workers} workers, a fault every {fault_every:.0f} s, "
        f"a publish every {interval[0] * 1000:.0f}-{interval[1] * 1000:.0f} ms",
        flush=True,
    )
    faults: list[tuple[float, str, dict | str]] = []
    rss: list[tuple[float, dict[int, float]]] = []
    broken: list[str] = []
    report = None
    with tempfile.TemporaryDirectory(prefix="offload-soak-") as tmp:
        try:
            # A room channel by default: the subscribers log in as alice (sessions
            # must survive reloads and worker kills); history 200 messages.
            stack = Stack.start(
                Path(tmp),
                subscribers=subscribers,
                channel=os.environ.get("SOAK_CHANNEL", "room:soak"),
                workers=workers,
                interval=interval,
                user="alice",
            )
        except Exception:
            traceback.print_exc()
            print("RESULT: FAILED (could not start)")
            return 2
        started = time.monotonic()
        try:
            stack.publisher.start()
            steps = cycle(
                [
                    ("redis restart", stack.redis_restart),
                    ("graceful reload", stack.reload),
                    ("worker SIGKILL", stack.kill_worker),
                ]
            )
            next_fault = started + fault_every
            next_sample = started
            next_line = started + 10
            while (now := time.monotonic()) < started + seconds:
                if now >= next_sample:
                    rss.append((now - started, {pid: round(rss_mb(pid), 1) for pid in worker_pids(stack.server)}))
                    next_sample = now + 5
                if now >= next_line:
                    pub = stack.publisher
                    lows = min(len(s.keys) for s in stack.subs)
                    print(
                        f"  {now - started:5.0f} s: {len(pub.acked)} published, {len(pub.refused)} refused, "
                        f"{stack.swarm.count(lambda s: s.live)}/{subscribers} live, fewest delivered {lows}, "
                        f"RSS {rss[-1][1] if rss else {}}",
                        flush=True,
                    )
                    next_line = now + 10
                if now >= next_fault and now + 15 < started + seconds:
                    name, step = next(steps)
                    try:
                        measured = step()
                        faults.append((now - started, name, measured))
                        print(f"  {now - started:5.0f} s: {name}: {measured}", flush=True)
                    except AssertionError as exc:
                        faults.append((now - started, name, f"FAILED: {exc}"))
                        broken.append(f"{name} at {now - started:.0f} s: {exc}")
                        print(f"  {now - started:5.0f} s: {name} FAILED: {exc}", flush=True)
                        stack.settle(60)
                    next_fault = time.monotonic() + fault_every
                time.sleep(0.2)
            report = stack.finish(timeout=60)
            try:
                check_log(stack.server)
            except AssertionError as exc:
                broken.append(str(exc)[:2000])
        except Exception:
            broken.append(traceback.format_exc())
        finally:
            stack.stop()
    pub = stack.publisher
    print("\n=== soak summary ===")
    print(f"ran {time.monotonic() - started:.0f} s")
    print(
        f"published: {len(pub.acked)} acknowledged, {len(pub.refused)} refused "
        f"(503 while Redis was down), {len(pub.uncertain)} uncertain (in flight when a worker died)"
    )
    delivered = sorted(len(s.keys) for s in stack.subs)
    print(
        f"delivered per subscriber: min {delivered[0]}, median {statistics.median(delivered):.0f}, "
        f"max {delivered[-1]}; reconnects: {sum(s.connects - 1 for s in stack.subs)}; "
        f"'recovered: false': {sum(len(s.unrecovered) for s in stack.subs)}"
    )
    for at, name, measured in faults:
        print(f"fault at {at:5.0f} s: {name}: {measured}")
    print("worker RSS (MB) over time:")
    for at, sample in rss[:: max(1, len(rss) // 20)]:
        print(f"  {at:5.0f} s: {sample}")
    if report is not None:
        print(report.summary())
        print(
            f"gaps: {sum(len(v) for v in report.missing.values())} ids in {len(report.missing)} subscribers; "
            f"duplicates: {sum(len(v) for v in report.duplicates.values())}; "
            f"unexpected: {sum(len(v) for v in report.unexpected.values())}; "
            f"out of order: {len(report.disorder)} subscribers"
        )
    for problem in broken:
        print(f"PROBLEM: {problem}")
    if report is not None and not report.ok:
        print("RESULT: FAILED (gaps or duplicates)")
        return 1
    if broken or report is None:
        print("RESULT: FAILED (a fault broke its promises, or the run did not complete)")
        return 2
    print("RESULT: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
