"""Benchmark knobs: ``BENCH_*`` environment variables over two scale presets.

``make bench`` runs the full scale; ``BENCH_SCALE=small`` (``make bench-quick``)
is a one-minute smoke run of the same code paths. Every knob has a preset
value so that a plain ``make bench`` is reproducible, and every one can be
overridden to explore (e.g. ``BENCH_SECONDS=60 make bench``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent

#: Values per scale; the issue's scenario is "full".
PRESETS: dict[str, dict] = {
    # two repeats of 20 s windows per mode, interleaved: about 4.5 minutes
    "full": {"seconds": 20.0, "warmup": 5.0, "subscribers": 1000, "downloads": 50, "file_mb": 100, "repeats": 2},
    # one repeat of 10 s windows: about a minute
    "small": {"seconds": 10.0, "warmup": 3.0, "subscribers": 100, "downloads": 5, "file_mb": 10, "repeats": 1},
}


@dataclass
class BenchConfig:
    """Everything a run depends on; stored in the results JSON."""

    scale: str = "full"
    #: length of each measuring window (idle, loaded), seconds
    seconds: float = 20.0
    #: publishing before the first window (connections settle, caches warm)
    warmup: float = 5.0
    #: after the load started, before the loaded window (downloads in flight, tasks running)
    settle: float = 3.0
    subscribers: int = 1000
    #: broadcast messages per second (HTTP publish API)
    rate: float = 10.0
    #: the "normal Django view" probe period, ms (GET /accounts/login/)
    probe_ms: float = 100.0
    downloads: int = 50
    file_mb: int = 100
    #: read speed of each slow download, KiB/s (lowered so a download outlasts the window)
    download_kbps: int = 1024
    tasks: int = 4
    task_rows: int = 200_000
    #: runs of every mode, alternating the order; the report shows medians
    repeats: int = 2
    modes: list[str] = field(default_factory=lambda: ["offload", "inline"])
    #: websocket handshakes in flight at once while connecting subscribers
    connect_concurrency: int = 50
    out_dir: str = str(BENCH_DIR / "results")
    #: the bench virtualenv's interpreter (load clients, plot)
    client_python: str = str(BENCH_DIR / ".venv-bench" / "bin" / "python")
    #: exit 1 when the offloading target (<= 2x idle) is missed
    strict: bool = False

    @property
    def task_seconds(self) -> float:
        """Tasks must outlast the loaded window (the view caps them at 60 s)."""
        return min(60.0, self.settle + self.seconds + 10.0)

    @property
    def download_bytes_per_s(self) -> int:
        """Slow enough that no download finishes inside the loaded window."""
        limit = self.file_mb * 2**20 / ((self.settle + self.seconds) * 1.5)
        return int(min(self.download_kbps * 1024, limit))

    def as_dict(self) -> dict:
        return asdict(self)


def _convert(kind, raw: str):
    if kind in (int, "int"):
        return int(raw)
    if kind in (float, "float"):
        return float(raw)
    if kind in (bool, "bool"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind in ("list[str]",):
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def from_env(environ: dict | None = None) -> BenchConfig:
    """Preset of ``BENCH_SCALE``, then each ``BENCH_<FIELD>`` that is set."""
    environ = os.environ if environ is None else environ
    scale = environ.get("BENCH_SCALE", "full")
    if scale not in PRESETS:
        raise SystemExit(f"BENCH_SCALE must be one of {', '.join(PRESETS)}, not {scale!r}")
    config = BenchConfig(scale=scale, **PRESETS[scale])
    for f in fields(BenchConfig):
        raw = environ.get(f"BENCH_{f.name.upper()}")
        if raw is not None and f.name != "scale":
            setattr(config, f.name, _convert(f.type, raw))
    if config.seconds <= 0 or config.subscribers <= 0 or config.rate <= 0:
        raise SystemExit("BENCH_SECONDS, BENCH_SUBSCRIBERS and BENCH_RATE must be positive")
    if config.seconds > 50:
        raise SystemExit("BENCH_SECONDS is at most 50: report tasks stop after 60 s (view cap)")
    return config
