"""Paired statistics over seeds: is arm B better than arm A by more than the seed-to-seed noise?

With n paired seeds and differences d_i = b_i − a_i, the mean difference d̄, its standard error s_d/√n and the 95 %
interval d̄ ± t_{0.975, n−1} s_d/√n (Student's t, as in the paper's "mean ± std over seeds" tables, made paired);
interval and two-sided p-value are the paired t-test's (``scipy.stats.ttest_rel(b, a)`` and its
``confidence_interval``).
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from scipy import stats as scipy_stats


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (nan for fewer than two values)."""
    values = [float(v) for v in values]
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else math.nan}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """b − a over paired seeds: mean, std, the `confidence` interval of the mean and the paired t-test's p-value."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-zero lengths, got {len(a)} and {len(b)}")
    differences = [float(y) - float(x) for x, y in zip(a, b)]
    n, mean = len(differences), statistics.fmean(differences)
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "low": math.nan, "high": math.nan, "p": math.nan}
    std = statistics.stdev(differences)
    if not std > 0:  # every seed moved by the same amount: no spread, the interval is the point
        return {"n": n, "mean": mean, "std": std, "low": mean, "high": mean, "p": 1.0 if mean == 0 else 0.0}
    test = scipy_stats.ttest_rel(b, a)
    interval = test.confidence_interval(confidence)
    return {"n": n, "mean": mean, "std": std, "low": float(interval.low), "high": float(interval.high),
            "p": float(test.pvalue)}


def seeds_to_resolve(std: float, delta: float, confidence: float = 0.95, most: int = 1000) -> int | None:
    """The fewest paired seeds n whose interval half-width t_{(1+confidence)/2, n−1} · std/√n is at most `delta`,
    given the spread `std` of the paired differences seen so far (None for no spread, or beyond `most`)."""
    if not std > 0 or not delta > 0:
        return None
    for n in range(2, most + 1):
        if scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n) <= delta:
            return n
    return None
