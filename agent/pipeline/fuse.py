"""Fusion of redundant sensors of one quantity, with a consistency check.

Each channel's estimate is its window mean; its variance is the variance of that mean,
``std**2 / count``, floored at ``fuse_sigma**2`` (the sensor's absolute accuracy), because
averaging many readings removes noise but not a sensor's bias. The fused value is the
inverse-variance weighted mean: a convex combination, so it always lies within the inputs.

Consistency: with three or more channels, each is compared with the fused estimate of the
others; the worst one further than ``k`` combined sigmas is excluded and flagged
``inconsistent:<channel>``, and the test repeats on the rest while three or more remain. Two
channels that disagree cannot be told apart: both are kept and the group is flagged
``disagreement:<group>``. Across windows, ``agent.pipeline.drift`` watches each group for slow
drift and tells ``fuse`` which channels to down-weight or leave out before this check runs.

The fused ``ChannelStats`` counts the readings of the channels it used; ``min``/``max`` span
theirs; ``std`` is the 1-sigma uncertainty of the fused mean (not a spread of readings);
``suspect``/``bad`` add up every member's.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from agent.quality import DISAGREEMENT, INCONSISTENT
from agent.readings import ChannelStats

DEFAULT_K = 3.0
_NAN = math.nan


@dataclass(frozen=True, slots=True)
class Member:
    """One channel of a fuse group and its accuracy floor (1 sigma, canonical units)."""

    channel: str
    sigma_floor: float


@dataclass(frozen=True, slots=True)
class Fused:
    stats: ChannelStats
    flags: tuple[str, ...]
    excluded: tuple[str, ...]


def _weighted(items: Sequence[tuple[str, float, float]]) -> tuple[float, float]:
    """Inverse-variance mean and its variance of (channel, mean, variance) items."""
    wsum = 0.0
    acc = 0.0
    for _, mean, var in items:
        w = 1.0 / var
        wsum += w
        acc += w * mean
    return acc / wsum, 1.0 / wsum


VAR_MIN = 1e-30  # far below any sensor's accuracy, far above float underflow
VAR_MAX = 1e300  # its inverse is still a positive weight


def _variances(stats: Sequence[tuple[Member, ChannelStats]]) -> list[float]:
    out = []
    for m, st in stats:
        spread = st.std if math.isfinite(st.std) else 0.0
        out.append(max(spread * spread / st.count, m.sigma_floor * m.sigma_floor))
    # A channel with neither spread nor a floor would take all the weight: give it the
    # smallest variance seen among the others instead (equal weights if there is none).
    # Below VAR_MIN the inverse overflows to inf and the weighted mean becomes NaN.
    positive = [v for v in out if v >= VAR_MIN]
    fallback = min(positive) if positive else 1.0
    return [v if v >= VAR_MIN else fallback for v in out]


def fuse(group: str, members: Sequence[Member], channels: dict[str, ChannelStats],
         k: float = DEFAULT_K, *, inflate: Mapping[str, float] | None = None,
         exclude: Collection[str] = ()) -> Fused:
    """Fuse the members' window statistics (``channels``, keyed by channel name).

    ``inflate`` multiplies the variance of channels (down-weights them) and ``exclude`` leaves
    channels out, as the cross-window drift monitor decides; an exclusion that would leave no
    channel is ignored.
    """
    present = [(m, channels[m.channel]) for m in members if m.channel in channels]
    suspect = sum(st.suspect for _, st in present)
    bad = sum(st.bad for _, st in present)
    usable = [(m, st) for m, st in present if st.count > 0 and math.isfinite(st.mean)]
    dropped: list[str] = []
    if exclude:
        kept = [(m, st) for m, st in usable if m.channel not in exclude]
        if kept:
            dropped = [m.channel for m, _ in usable if m.channel in exclude]
            usable = kept
    unit = present[0][1].unit if present else ""
    if not usable:
        empty = ChannelStats(0, _NAN, _NAN, _NAN, _NAN, _NAN, unit, suspect, bad)
        return Fused(empty, (), ())

    variances = _variances(usable)
    if inflate:
        variances = [v * inflate.get(m.channel, 1.0)
                     for (m, _), v in zip(usable, variances, strict=True)]
    # A huge spread (values near the float limit) would give a zero weight to every channel.
    variances = [v if v <= VAR_MAX else VAR_MAX for v in variances]
    items = [(m.channel, st.mean, var) for (m, st), var in zip(usable, variances, strict=True)]
    flags: list[str] = []
    excluded: list[str] = dropped
    while len(items) >= 3:
        worst_i, worst_z = -1, k
        for i, (_, mean, var) in enumerate(items):
            o_mean, o_var = _weighted(items[:i] + items[i + 1:])
            z = abs(mean - o_mean) / math.sqrt(var + o_var)
            if z > worst_z:
                worst_i, worst_z = i, z
        if worst_i < 0:
            break
        channel = items.pop(worst_i)[0]
        excluded.append(channel)
        flags.append(INCONSISTENT + channel)
    if len(items) == 2:
        (_, m1, v1), (_, m2, v2) = items
        if abs(m1 - m2) > k * math.sqrt(v1 + v2):
            flags.append(DISAGREEMENT + group)

    mean, var = _weighted(items)
    used = {c for c, _, _ in items}
    kept = [(m, st) for m, st in usable if m.channel in used]
    lo = min(st.mean for _, st in kept)
    hi = max(st.mean for _, st in kept)
    # Rounding may put a weighted mean an ulp outside its inputs.
    mean = min(max(mean, lo), hi)
    weights = [1.0 / v for c, _, v in items]
    last = sum(w * st.last for w, (_, st) in zip(weights, kept, strict=True)) / sum(weights)
    stats = ChannelStats(
        count=sum(st.count for _, st in kept),
        mean=mean,
        min=min(st.min for _, st in kept),
        max=max(st.max for _, st in kept),
        last=min(max(last, min(st.last for _, st in kept)), max(st.last for _, st in kept)),
        std=math.sqrt(var),
        unit=unit,
        suspect=suspect,
        bad=bad,
    )
    return Fused(stats, tuple(flags), tuple(excluded))
