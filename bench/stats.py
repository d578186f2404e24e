"""Small statistics shared by the benches (nearest-rank percentiles of latency samples)."""

from __future__ import annotations


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``samples``."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
