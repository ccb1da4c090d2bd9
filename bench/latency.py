"""Latency percentiles as the benchmarks report them (nearest rank, plus the mean)."""

from __future__ import annotations

import math
import statistics


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50/p90/p99 (nearest rank) and mean of `values` times `scale`; None when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)
    pick = {q: ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 90, 99)}
    return {
        "p50": pick[50] * scale,
        "p90": pick[90] * scale,
        "p99": pick[99] * scale,
        "mean": statistics.fmean(ordered) * scale,
    }
