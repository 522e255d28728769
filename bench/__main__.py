"""``python -m bench [SCENARIO]`` (project .venv): run a scenario, write and print its report.

``python -m bench --render RESULTS.json...`` renders saved results again
(Markdown and PNG beside the JSON), e.g. after a change of the tables.
``make bench`` runs it after creating both virtualenvs; knobs are ``BENCH_*``
environment variables (``bench/config.py``, each scenario's ``KNOBS``).
Servers and clients are stopped on every way out (end, error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from . import config, report
from .harness import Bench
from .scenarios import SCENARIOS


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--render"]:
        for path in map(Path, argv[2:]):
            print(render(json.loads(path.read_text()), path.with_suffix(""), config.Config.from_env()))
        return 0
    name = argv[1] if len(argv) > 1 else "offload"
    if name not in SCENARIOS:
        print(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    cfg, scenario = config.Config.from_env(), SCENARIOS[name]
    if not Path(cfg.client_python).exists():
        print(f"{cfg.client_python} is missing: run `make bench` (it creates the bench venv)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    started = datetime.datetime.now()
    stem = Path(cfg.out_dir) / f"{started:%Y-%m-%d-%H%M%S}-{name}"
    logs = stem.with_name(stem.name + "-logs")
    results = {"scenario": name, "started": started.isoformat(timespec="seconds"), "command": _command(name)}
    results.update(scale=cfg.scale, knobs=config.knobs(scenario.PREFIX, scenario.KNOBS, cfg.scale))
    results["machine"] = report.machine()
    try:
        with tempfile.TemporaryDirectory(prefix=f"offload-bench-{name}-") as work:
            with Bench(cfg, Path(work), logs) as bench:
                results.update(scenario.run(bench, results["knobs"]))
    except KeyboardInterrupt:
        print("\ninterrupted: servers and clients stopped", file=sys.stderr)
        return 130
    except Exception:
        print(f"\nbenchmark failed; logs in {logs}", file=sys.stderr)
        raise
    print(f"measured in {(datetime.datetime.now() - started).total_seconds():.0f} s; drawing the plot", file=sys.stderr)
    print(render(results, stem, cfg), f"\nlogs: {logs}")
    return 0


def render(results: dict, stem: Path, cfg: config.Config) -> str:
    """Write the JSON (first: a report that fails to render can be rendered again), Markdown and PNG of
    ``results``; returns the Markdown and where the files are."""
    scenario, paths = SCENARIOS[results["scenario"]], report.paths(stem)
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    results["warnings"] = scenario.warnings(results)
    markdown, results["plot"] = scenario.markdown(results), scenario.plot(results)
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown)
    error = report.plot(cfg.client_python, paths["json"], paths["png"])
    if error:
        print(f"plot failed: {error}", file=sys.stderr)
    return markdown + "\n" + "\n".join(f"{kind}: {p}" for kind, p in paths.items() if kind != "png" or not error)


def _command(name: str) -> str:
    """How to reproduce this run (the BENCH_* knobs that were set)."""
    knobs = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_") and k != "BENCH_CLIENT_PYTHON"]
    return " ".join([*knobs, f"python -m bench {name}"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
