"""Knobs: ``BENCH_*`` environment variables over two scale presets (``full``, ``small``: a smoke run of the same paths).

``BENCH_<PREFIX><NAME>`` overrides a scenario knob's preset and keeps its type (a list is comma-separated), so
every run is reproducible from its ``command``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
SCALES = ("full", "small")


@dataclass
class Config:
    """What every scenario shares: ``BENCH_SCALE``, ``BENCH_CLIENT_PYTHON`` (the bench venv's interpreter: load
    clients, plot) and ``BENCH_OUT_DIR``."""

    scale: str = "full"
    client_python: str = str(BENCH_DIR / ".venv-bench" / "bin" / "python")
    out_dir: str = str(BENCH_DIR / "results")

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        cfg = cls(env.get("BENCH_SCALE", cls.scale), env.get("BENCH_CLIENT_PYTHON", cls.client_python))
        if cfg.scale not in SCALES:
            raise SystemExit(f"BENCH_SCALE must be one of {', '.join(SCALES)}, not {cfg.scale!r}")
        cfg.out_dir = env.get("BENCH_OUT_DIR", cfg.out_dir)
        return cfg


def knobs(prefix: str, table: dict[str, tuple], scale: str) -> dict:
    """The preset of ``scale`` for each knob of ``table``, overridden by ``BENCH_<PREFIX><NAME>``."""
    out = {}
    for name, presets in table.items():
        value = presets[SCALES.index(scale)]
        raw = os.environ.get(f"BENCH_{prefix}{name.upper()}")
        if raw is not None:
            kind = type(value[0]) if isinstance(value, list) else type(value)
            value = [kind(x.strip()) for x in raw.split(",") if x.strip()] if isinstance(value, list) else kind(raw)
        out[name] = value
    return out
