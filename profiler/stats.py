"""Summary statistics of repeated timings: the median and the interquartile range.

Owns: `median` and `iqr`, pure Python (no torch), shared by compute.py and links.py.
The spread the profile records is the IQR (75th minus 25th percentile, linear interpolation
between order statistics, numpy's default "linear" method); with fewer than 4 repeats it is
computed the same way and says little, which is why --quick records its repeat count.
"""

from __future__ import annotations

from collections.abc import Sequence


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Percentile q in [0, 1] by linear interpolation (numpy.percentile, method='linear')."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def median(values: Sequence[float]) -> float:
    return _percentile(sorted(values), 0.5)


def iqr(values: Sequence[float]) -> float:
    s = sorted(values)
    return _percentile(s, 0.75) - _percentile(s, 0.25)
