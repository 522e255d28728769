"""Scenarios, registered by name for ``python -m bench NAME`` (in ``make bench`` order).

A module has ``PREFIX`` and ``KNOBS`` (``bench/config.py``), ``run(bench, knobs)`` (the results that go to JSON,
with a ``verdict``), ``markdown(results)``, ``warnings(results)`` and ``plot(results)`` (the PNG's panels, as data).
"""

from __future__ import annotations

from . import backpressure, fanout, manychannels, offload, presence, publish

SCENARIOS = {"offload": offload, "fanout": fanout, "manychannels": manychannels, "publish": publish}
SCENARIOS.update(backpressure=backpressure, presence=presence)
