"""Results on disk: ``<stamp>-<scenario>.json`` / ``.md`` / ``.png`` in bench/results/.

The JSON holds everything (config, machine, every repeat, medians, verdict)
so later scenarios and comparisons can be computed from it; the Markdown is
the human table (also printed); the PNG is drawn by ``bench.plot`` in the
bench venv, where matplotlib lives.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .config import PROJECT_DIR


def cell(value, suffix: str = "") -> str:
    """A table cell: numbers rounded for reading, missing values as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
        return text + suffix
    return f"{value}{suffix}"


def latency_cells(summary: dict) -> list[str]:
    """p50, p90, p99 and max of a latency summary (``bench.stats``), as cells."""
    return [cell(summary[q]) for q in ("p50", "p90", "p99", "max")]


def table(head: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict_table(verdict: dict, first: str = "target", number: str = ",") -> str:
    """The targets table of a scenario's ``verdict`` ({name: {value, op, target, met}})."""
    rows = []
    for name, v in verdict.items():
        state = "not measured" if v["met"] is None else ("met" if v["met"] else "**MISSED**")
        rows.append([name, cell(v["value"]), f"{v['op']} {v['target']:{number}}", state])
    return table([first, "measured", "target", "state"], rows)


def warning_lines(warnings: list[str] | None) -> list[str]:
    """The "Warnings" paragraph closing a scenario's Markdown (nothing when there are none)."""
    return ["", "**Warnings**:", ""] + [f"* {x}" for x in warnings] if warnings else []


def machine() -> dict:
    """Where the figures come from: CPUs, load, the commit under test."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "commit": commit or "unknown"}


def write(results: dict, markdown: str, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown)
    return paths


def plot(python: str, json_path: Path, png_path: Path) -> str | None:
    """Draw the PNG in the bench venv; returns an error text instead of raising."""
    try:
        done = subprocess.run(
            [python, "-m", "bench.plot", str(json_path), str(png_path)],
            cwd=PROJECT_DIR,
            env=dict(os.environ, PYTHONPATH=str(PROJECT_DIR), MPLBACKEND="Agg"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr[-2000:]
