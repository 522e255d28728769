"""Knobs: two scale presets (``full``, ``small``: a smoke run of the same paths), each overridden by
``BENCH_<PREFIX><NAME>`` in its type (a list comma-separated), so every run is reproducible from its ``command``."""

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
        names = ("scale", "client_python", "out_dir")  # BENCH_SCALE, ...
        cfg = cls(*(os.environ.get(f"BENCH_{name.upper()}", getattr(cls, name)) for name in names))
        if cfg.scale not in SCALES:
            raise SystemExit(f"BENCH_SCALE must be one of {', '.join(SCALES)}, not {cfg.scale!r}")
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
