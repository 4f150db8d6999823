"""Small statistics shared by the benchmarks."""

from __future__ import annotations

import math
import statistics


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of them at or below it."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def median(values: list[float]) -> float:
    """The median of the values that are numbers (NaN left out); NaN if none is."""
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt_ratio(value: float, base: float | None) -> str:
    """`` (1.23x)``: value against a baseline, for a table cell; empty when either is missing."""
    if base is None or not base or base != base or value != value:
        return ""
    return f" ({value / base:.2f}x)"
