"""``python -m bench [SCENARIO]`` (project .venv): run a scenario, write and print its report; ``--render
RESULTS.json...`` renders saved results again. Servers and clients are stopped on every way out (SIGTERM too)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import config
from .config import PROJECT_DIR
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
    results["machine"] = machine()
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
    scenario = SCENARIOS[results["scenario"]]
    paths = {kind: stem.with_name(f"{stem.name}.{kind}") for kind in ("json", "md", "png")}
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    results["warnings"] = scenario.warnings(results)
    markdown, results["plot"] = scenario.markdown(results), scenario.plot(results)
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown)
    error = draw(cfg.client_python, paths["json"], paths["png"])
    if error:
        print(f"plot failed: {error}", file=sys.stderr)
    return markdown + "\n" + "\n".join(f"{kind}: {p}" for kind, p in paths.items() if kind != "png" or not error)


def machine() -> dict:
    """Where the figures come from: CPUs, load, the commit under test."""
    try:
        how = {"cwd": PROJECT_DIR, "capture_output": True, "text": True, "timeout": 10}
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], **how).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "commit": commit or "unknown"}


def draw(python: str, json_path: Path, png_path: Path) -> str | None:
    """Draw the PNG in the bench venv; returns an error text instead of raising."""
    try:
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR), MPLBACKEND="Agg")
        argv = [python, "-m", "bench.plot", str(json_path), str(png_path)]
        done = subprocess.run(argv, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr[-2000:]


def _command(name: str) -> str:
    """How to reproduce this run (the BENCH_* knobs that were set)."""
    knobs = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_") and k != "BENCH_CLIENT_PYTHON"]
    return " ".join([*knobs, f"python -m bench {name}"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
