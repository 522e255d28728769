"""Percentiles and medians, stdlib only (every environment imports it): samples in integer µs, summaries in ms."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def summarize_us(values: Iterable[int], cdf_points: int = 0) -> dict:
    """n, p50/p90/p99/p99.9/max and mean in ms of µs samples; with ``cdf_points``, that many evenly spaced
    quantiles (``cdf_ms``): enough to draw a CDF without shipping every sample."""
    ordered = sorted(values)
    out: dict = {"n": len(ordered)}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100)):  # nearest rank
        rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
        out[name] = round(ordered[rank - 1] / 1000, 3) if ordered else None
    out["mean"] = round(statistics.fmean(ordered) / 1000, 3) if ordered else None
    if cdf_points and ordered:
        step = (len(ordered) - 1) / max(1, cdf_points - 1)
        out["cdf_ms"] = [round(ordered[round(i * step)] / 1000, 3) for i in range(cdf_points)]
    return out


def spread(values: Iterable[float]) -> dict:
    """min / median / max of a few values (None when there are none)."""
    ordered = sorted(values)
    if not ordered:
        return {"min": None, "median": None, "max": None}
    return {"min": ordered[0], "median": round(statistics.median(ordered), 2), "max": ordered[-1]}


def median_merge(items: list):
    """Merge repeated results leaf by leaf: dicts key by key (the first's keys), the median of numbers; anything
    else (strings, lists such as CDFs) comes from the first repeat."""
    first = items[0]
    if len(items) == 1:
        return first
    if isinstance(first, dict):
        return {k: median_merge([i[k] for i in items if isinstance(i, dict) and k in i]) for k in first}
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first
    numbers = [i for i in items if isinstance(i, (int, float)) and not isinstance(i, bool)]
    middle = statistics.median(numbers)
    if all(isinstance(i, int) for i in numbers) and middle == int(middle):
        return int(middle)  # counts stay counts
    return round(middle, 3)


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """a / b, None when either is missing or b is zero."""
    return None if a is None or not b else round(a / b, digits)
