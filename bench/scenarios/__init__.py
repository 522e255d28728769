"""Scenarios: one module each, registered by name for ``python -m bench NAME``.

A scenario module provides ``plan(cfg)`` (progress steps with expected
seconds), ``run(cfg, work_dir, logs_dir, progress)`` (returns the results
dict that goes to JSON, with ``"scenario": NAME``) and ``markdown(results)``.
``bench.plot`` has the matching PNG drawing, keyed by the same name.
"""

from __future__ import annotations

from . import backpressure, fanout, manychannels, offload, publish

SCENARIOS = {"offload": offload, "fanout": fanout}
SCENARIOS.update({"manychannels": manychannels, "publish": publish})
SCENARIOS.update({"backpressure": backpressure})
