"""Robust statistics the calibration is built from: tail limits, episode trimming, run minima,
the chance of an exact repeat, a Student-t quantile, circular filling."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

F = NDArray[np.float64]
TRIM_Z = 6.0


def tail_limit(x: F, per_30d: float, budget_per_30d: float) -> float:
    """Value exceeded ``budget_per_30d`` times in 30 days, ``x`` being ``per_30d`` draws a month."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return -math.inf
    top = float(x.max())
    if len(x) < 100:
        return top
    u = float(np.quantile(x, 0.99))
    beta = float(np.mean(x[x > u] - u)) if np.any(x > u) else 0.0
    p_target = budget_per_30d / max(per_30d, 1.0)
    t = u + beta * math.log(0.01 / p_target) if p_target < 0.01 else u
    return max(t, top)


def trim_episodes(x: F, per_day: int, min_spread: float) -> F:
    """``x`` without the gross episodes of single days (NaN in their place); see the docstring."""
    n_days = len(x) // per_day
    if n_days < 5:
        return x
    with np.errstate(all="ignore"):
        days = x[:n_days * per_day].reshape(n_days, per_day)
        ok = np.isfinite(days).any(axis=1)
        daily = np.full(n_days, np.nan)
        daily[ok] = np.nanmax(days[ok], axis=1)
    tops = daily[np.isfinite(daily)]
    if len(tops) < 5:
        return x
    med = float(np.median(tops))
    # ``min_spread`` is the statistic's resolution: daily maxima that agree to better than
    # that (lights by day: 0 W every day) would otherwise make any difference an episode.
    spread = max(1.4826 * float(np.median(np.abs(tops - med))), min_spread)
    cut = med + TRIM_Z * spread
    # On a day with an episode, its run-up too (a drift ramping, a fault part way in) is
    # dropped: everything above what a typical day's maximum is.
    bad = np.repeat(np.nan_to_num(daily, nan=-np.inf) > cut, per_day)
    bad = np.concatenate([bad, np.zeros(len(x) - len(bad), dtype=bool)])
    out: F = np.where((x > cut) | (bad & (x > med)), np.nan, x)
    return out


def run_min(x: F, k: int) -> F:
    """Minimum over each run of ``k`` consecutive windows ending at that window."""
    if len(x) < k:
        return np.full(0, np.nan)
    return np.asarray(np.lib.stride_tricks.sliding_window_view(x, k).min(axis=1), dtype=float)


def equal_probability(x: F) -> float:
    """Chance that a window repeats the previous mean exactly, at the quietest load seen.

    Exact repeats are too rare to count in two weeks, so the chance is read off the density of
    window-to-window changes near zero, in the load decile where changes are smallest.
    """
    a, b = x[:-1], x[1:]
    ok = np.isfinite(a) & np.isfinite(b)
    a, diff = a[ok], np.abs(b[ok] - a[ok])
    if len(diff) < 1000:
        return 0.05
    # Exact repeats are what a frozen meter makes: the chance of one is estimated from the
    # changes just above zero, so a frozen spell in the history does not raise it.
    a, diff = a[diff > 0], diff[diff > 0]
    if len(diff) < 1000:
        return 0.05
    res = float(diff.min())  # the meter's resolution, as far as it shows
    band = 20.0 * res
    worst = 0.0
    edges = np.quantile(a, np.linspace(0, 1, 11))
    for lo, hi in itertools.pairwise(edges):
        d = diff[(a >= lo) & (a <= hi)]
        if len(d) >= 100:
            near = (np.count_nonzero(d <= band) + 1) / (len(d) + 2)
            worst = max(worst, near / (2 * band / res))
    return min(max(worst, 1e-6), 0.5)


def student_t_quantile(p: float, dof: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion (ample for dof >= 5)."""
    z = NormalDist().inv_cdf(p)
    v = float(max(dof, 1))
    return z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)


def fill_circular(values: F) -> F:
    """Replace NaN bins by the nearest bin with a value, going round the clock."""
    out = values.copy()
    known = np.flatnonzero(np.isfinite(values))
    if len(known) == 0:
        return np.zeros_like(values)
    n = len(values)
    for i in np.flatnonzero(~np.isfinite(values)):
        d = np.minimum(np.abs(known - i), n - np.abs(known - i))
        out[i] = values[known[np.argmin(d)]]
    return out
