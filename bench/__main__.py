"""``python -m bench [SCENARIO]`` (project .venv): run a scenario, write and print the report.

``make bench`` runs it after creating both virtualenvs; knobs are ``BENCH_*``
environment variables (see ``bench/config.py``). Servers and clients are
stopped on every way out (normal end, error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import config, report
from .progress import Progress
from .scenarios import SCENARIOS


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    name = argv[1] if len(argv) > 1 else "offload"
    if name not in SCENARIOS:
        print(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    scenario = SCENARIOS[name]
    cfg = config.from_env()
    if not Path(cfg.client_python).exists():
        print(f"{cfg.client_python} is missing: run `make bench` (it creates the bench venv)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)

    started = datetime.datetime.now()
    stem = f"{started:%Y-%m-%d-%H%M%S}-{name}"
    out_dir = Path(cfg.out_dir)
    logs = out_dir / f"{stem}-logs"
    progress = Progress(scenario.plan(cfg))
    results = {
        "scenario": name,
        "started": started.isoformat(timespec="seconds"),
        "command": _command(name),
        "config": cfg.as_dict(),
        "derived": {
            "download_kib_per_s": cfg.download_bytes_per_s // 1024,
            "task_seconds": cfg.task_seconds,
        },
        "machine": report.machine(),
    }
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix=f"offload-bench-{name}-") as work:
            results.update(scenario.run(cfg, Path(work), logs, progress))
    except KeyboardInterrupt:
        progress.clear()
        print("\ninterrupted: servers and clients stopped", file=sys.stderr)
        return 130
    except Exception:
        progress.clear()
        print(f"\nbenchmark failed; logs in {logs}", file=sys.stderr)
        raise
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["warnings"] = scenario.warnings(results)
    progress.finish(f"measured in {results['elapsed_s']:.0f} s; drawing the plot")

    markdown = scenario.markdown(results)
    paths = report.write(results, markdown, out_dir, stem)
    error = report.plot(cfg.client_python, paths["json"], paths["png"])
    print(markdown)
    for kind, path in paths.items():
        if kind != "png" or error is None:
            print(f"{kind}: {path}")
    print(f"logs: {logs}")
    if error:
        print(f"plot failed: {error}", file=sys.stderr)
    missed = [mode for mode, v in results["verdict"].items() if mode == "offload" and not v["met"]]
    return 1 if cfg.strict and missed else 0


def _command(name: str) -> str:
    """How to reproduce this run (the BENCH_* knobs that were set)."""
    knobs = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_") and k != "BENCH_CLIENT_PYTHON"]
    return " ".join([*knobs, "make bench" if name == "offload" else f"python -m bench {name}"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
