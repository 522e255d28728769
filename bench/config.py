"""Knobs: ``BENCH_*`` environment variables over two scale presets.

Every scenario declares its knobs as ``{name: (full, small)}``; the value
of ``BENCH_<PREFIX><NAME>`` (e.g. ``BENCH_FANOUT_SECONDS``) overrides the
preset of ``BENCH_SCALE`` (``full``, the default, or ``small``: a short
smoke run of the same code paths). A knob keeps the type of its preset (a
list is comma-separated), so every run is reproducible from its ``command``.
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
    """What every scenario shares (stored in the results JSON)."""

    scale: str = "full"
    #: the bench virtualenv's interpreter (load clients, plot)
    client_python: str = str(BENCH_DIR / ".venv-bench" / "bin" / "python")
    out_dir: str = str(BENCH_DIR / "results")
    #: exit 1 when a target is missed
    strict: bool = False

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        cfg = cls(scale=env.get("BENCH_SCALE", "full"), strict=env.get("BENCH_STRICT", "0") in ("1", "true", "yes"))
        if cfg.scale not in SCALES:
            raise SystemExit(f"BENCH_SCALE must be one of {', '.join(SCALES)}, not {cfg.scale!r}")
        cfg.client_python = env.get("BENCH_CLIENT_PYTHON", cfg.client_python)
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
