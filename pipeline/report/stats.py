"""Statistics shared by `evaluate` (which writes intervals) and `report` (which reads them).

Plain Python: no torch, no numpy, so the report can use it without loading either.
"""
from __future__ import annotations

import math

__all__ = ["Z95", "wilson_interval"]

Z95 = 1.959964  # the standard normal quantile of a two-sided 95% interval


def wilson_interval(errors: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0 and n)."""
    if n == 0:
        return (0.0, 1.0)
    p = errors / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
