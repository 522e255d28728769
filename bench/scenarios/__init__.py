"""Scenarios by name, in ``make bench`` order. Each has ``PREFIX``, ``KNOBS``, ``run(bench, knobs)`` (JSON results
with a ``verdict``), ``markdown(results)``, ``warnings(results)`` and ``plot(results)`` (the PNG's panels, as data)."""

from __future__ import annotations

from . import backpressure, fanout, manychannels, offload, presence, publish

SCENARIOS = {m.__name__.rpartition(".")[2]: m for m in (offload, fanout, manychannels, publish, backpressure, presence)}
