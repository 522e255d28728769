"""``python -m bench.offload_publisher CONFIG_JSON`` (project .venv): call ``offload.publish()`` flat out.

A Django process (``DJANGO_SETTINGS_MODULE=project.settings``, the project's
own settings) that calls ``offload.publish(channel, {"t": ns, "seq": g})``
from ``concurrency`` callers at once, each calling again as soon as its
previous call returned (closed loop), for ``seconds``: what a busy site's
views or tasks do to the library's publish path (pooled Redis client, Lua
script, idempotency token), measured per call.

``mode``:

* ``gevent``: greenlets after ``gevent.monkey.patch_all()``, as views run
  in the project's uWSGI workers (``gevent-early-monkey-patch``); each
  greenlet yields between calls (``gevent.sleep(0)``, as a view does when
  it writes its response), else one whose Redis replies come back at once
  would run call after call and starve the others;
* ``threads``: OS threads, as in a threaded WSGI server or a task runner.

Config: ``redis_url`` (the server's Redis), ``var_dir`` (a scratch
``OFFLOAD_VAR_DIR`` for the settings module), ``mode``, ``concurrency``,
``seconds``, ``first_seq``, ``channels`` and ``channel_prefix`` (publish
``g`` goes to channel ``g % channels``: ``bench/spread.py``). Every caller
first publishes once to ``public:warmup`` (nobody listens), so connections
and the script are ready; then it prints ``{"event": "ready"}`` and starts
when a line arrives on stdin. Prints one JSON line at the end: ``first``,
``count``, ``ok``, ``failed`` (numbers whose call raised, at most 10,000),
``errors`` (by exception type), ``seconds`` (start to last return),
``publishes_per_s`` and ``latency`` (ms per call: p50/p90/p99/max), then
exits at EOF of stdin.
"""

from __future__ import annotations

import json
import os
import sys

MAX_FAILED = 10_000


def main(cfg: dict) -> dict:
    mode = cfg.get("mode", "gevent")
    if mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
    elif mode != "threads":
        raise SystemExit(f"mode must be gevent or threads, not {mode!r}")

    import itertools
    import time
    from collections import Counter

    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    os.environ["REDIS_URL"] = cfg["redis_url"]
    os.environ["OFFLOAD_VAR_DIR"] = cfg["var_dir"]
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-offload-publisher-not-secret")
    import django

    django.setup()
    import offload

    from .spread import PREFIX, channel_index, channel_name
    from .stats import summarize_us

    channels = int(cfg["channels"])
    names = [channel_name(i, cfg.get("channel_prefix", PREFIX)) for i in range(channels)]
    concurrency = int(cfg["concurrency"])
    first = int(cfg["first_seq"])
    numbers = itertools.count(first)  # next() is atomic under the GIL: each number used once
    latencies: list[list[int]] = [[] for _ in range(concurrency)]
    errors: Counter[str] = Counter()
    failed: list[int] = []
    last_return = [0.0]

    if mode == "gevent":
        from gevent import sleep as pause  # a request boundary: the greenlet yields, as a view's response does
    else:

        def pause(_seconds: float = 0) -> None:
            pass

    def caller(slot: int, until: float) -> None:
        mine = latencies[slot]
        while time.monotonic() < until:
            pause(0)
            g = next(numbers)
            data = {"t": time.time_ns(), "seq": g}
            started = time.perf_counter_ns()
            try:
                offload.publish(names[channel_index(g, channels)], data)
            except Exception as exc:  # BackendUnavailable, OutcomeUnknown, ...
                errors[type(exc).__name__] += 1
                if len(failed) < MAX_FAILED:
                    failed.append(g)
            else:
                mine.append((time.perf_counter_ns() - started) // 1000)
            last_return[0] = time.monotonic()

    def warm(_slot: int) -> None:
        offload.publish("public:warmup", {"warmup": True})

    if mode == "gevent":
        import gevent

        def run_all(target, *args) -> None:
            gevent.joinall([gevent.spawn(target, i, *args) for i in range(concurrency)], raise_error=True)
    else:
        import threading

        def run_all(target, *args) -> None:
            threads = [threading.Thread(target=target, args=(i, *args)) for i in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    run_all(warm)
    print(json.dumps({"event": "ready"}), flush=True)
    if not sys.stdin.readline():
        sys.exit("stdin closed before go: the orchestrator is gone")
    started = time.monotonic()
    run_all(caller, started + float(cfg["seconds"]))
    took = max(1e-9, last_return[0] - started)
    flat = [v for mine in latencies for v in mine]
    count = next(numbers) - first
    return {
        "mode": mode,
        "concurrency": concurrency,
        "first": first,
        "count": count,
        "ok": len(flat),
        "failed": failed,
        "errors": dict(errors),
        "seconds": round(took, 3),
        "publishes_per_s": round(len(flat) / took, 1),
        "latency": summarize_us(flat),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
    sys.stdin.read()  # exit at EOF: the orchestrator reads our CPU time first
