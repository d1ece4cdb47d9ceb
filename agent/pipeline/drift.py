"""Drift between redundant sensors, found across windows before it is large.

The per-window consistency check in ``agent.pipeline.fuse`` tests each channel against the
others at the accuracy floor (``fuse_sigma``), so a slow drift is seen only once it is about
three floors off. Here each fuse group keeps, across windows, the usual difference of every pair
of its channels (a slow EWMA: sensors carry a steady bias) and a two-sided CUSUM of how far the
difference departs from it, in units of ``SCALE_FRACTION`` x the pair's floors (plus the
statistical spread of the two window means).

Attribution: with three or more channels present, a channel's step is the pair departure of
smallest size among its pairs, and only when all its pairs depart the same way: a drifting
channel departs from every other, while its peers depart only from it. A suspect channel
(CUSUM at ``SUSPECT_S``) is down-weighted in fusion (its variance times ``(S / SUSPECT_S)**2``,
flag ``downweighted:<channel>``); at ``CUSUM_H`` it is excluded (``drift:<channel>``) until its
CUSUM falls back below ``SUSPECT_S``. At most all but two present channels are excluded. One
window counts at most ``Z_CAP`` units; a departure beyond ``Z_REBASE`` units is a break, not a
drift (the per-window check flags it), and the pair's history starts again.
Two channels cannot be told apart: the pair's own CUSUM flags ``drift:<group>``, both are kept.

A frozen sensor is caught per reading by the cleaner (reason ``frozen``); one that froze while
the others move also drifts away from them here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from agent.pipeline.fuse import Member
from agent.quality import DOWNWEIGHTED, DRIFT
from agent.readings import ChannelStats

SCALE_FRACTION: Final = 0.1  # a departure of this fraction of the floors is one unit
CUSUM_K: Final = 1.0  # allowance per window, in units: noise below it never accumulates
CUSUM_H: Final = 6.0  # decision level: drift
CUSUM_MAX: Final = 2 * CUSUM_H  # a channel back in line is trusted again within ~12 windows
SUSPECT_S: Final = 2.0  # down-weighting starts here; an excluded channel returns below it
BASELINE_ALPHA: Final = 1.0 / 64.0  # per window: the usual difference follows in ~64 windows
Z_CAP: Final = 10.0  # one window adds at most this much: a single odd window flags, then fades
Z_REBASE: Final = 1000.0  # a departure this large is a break, not a drift: history restarts



@dataclass(frozen=True, slots=True)
class Verdict:
    """What fusion should do with a group's channels in one window."""

    inflate: dict[str, float]  # variance factor > 1 for suspect channels
    exclude: frozenset[str]
    flags: tuple[str, ...]


_NONE: Final = Verdict({}, frozenset(), ())


class _Cusum:
    __slots__ = ("down", "up")

    def __init__(self) -> None:
        self.up = 0.0
        self.down = 0.0

    def step(self, z: float) -> float:
        # Capped, so that a channel that comes back is trusted again within a few windows
        # however long it was off.
        self.up = min(max(0.0, self.up + z - CUSUM_K), CUSUM_MAX)
        self.down = min(max(0.0, self.down - z - CUSUM_K), CUSUM_MAX)
        return self.level()

    def level(self) -> float:
        return max(self.up, self.down)


class DriftMonitor:
    """The cross-window state of one fuse group; ``update`` once per window, in time order."""

    def __init__(self, group: str, members: Sequence[Member]) -> None:
        self.group = group
        self.names = [m.channel for m in members]
        self.floors = [m.sigma_floor for m in members]
        n = len(members)
        self.pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        self.base: dict[tuple[int, int], float] = {}
        self.pair_cusum = {p: _Cusum() for p in self.pairs}
        self.cusum = [_Cusum() for _ in range(n)]
        self.excluded: set[int] = set()

    def update(self, channels: Mapping[str, ChannelStats]) -> Verdict:
        present: list[int] = []
        for i, name in enumerate(self.names):
            st = channels.get(name)
            if st is not None and st.count > 0 and math.isfinite(st.mean):
                present.append(i)
        if len(present) < 2:
            return _NONE
        means = {i: channels[self.names[i]].mean for i in present}
        spread = {i: _mean_var(channels[self.names[i]]) for i in present}
        z: dict[tuple[int, int], float] = {}
        for p in self.pairs:
            i, j = p
            if i not in means or j not in means:
                continue
            diff = means[i] - means[j]
            if not math.isfinite(diff):
                continue  # two huge means: no evidence either way
            base = self.base.get(p)
            if base is None:
                base = self.base[p] = diff
            fi, fj = SCALE_FRACTION * self.floors[i], SCALE_FRACTION * self.floors[j]
            scale = math.sqrt(fi * fi + fj * fj + spread[i] + spread[j])
            zp = (diff - base) / scale if scale > 0.0 else 0.0
            if not math.isfinite(zp) or abs(zp) > Z_REBASE:
                # No drift moves this far: a broken reading or a swapped sensor, which the
                # per-window check flags. Start the pair's history again from here.
                self.base[p] = diff
                continue
            z[p] = max(-Z_CAP, min(zp, Z_CAP))
        levels = self._channel_levels(present, z)
        pair_level = 0.0
        for p, zp in z.items():
            level = self.pair_cusum[p].step(zp)
            if len(present) == 2:
                pair_level = level
        self._follow_baselines(z, means)
        return self._verdict(present, levels, pair_level)

    def _channel_levels(self, present: list[int],
                        z: dict[tuple[int, int], float]) -> dict[int, float]:
        levels: dict[int, float] = {}
        if len(present) < 3:
            return {i: self.cusum[i].level() for i in present}
        for i in present:
            steps = [(z[(i, j)] if i < j else -z[(j, i)]) for j in present
                     if j != i and ((i, j) in z or (j, i) in z)]
            if not steps:
                levels[i] = self.cusum[i].level()
                continue
            if all(s > 0.0 for s in steps):
                step = min(steps)
            elif all(s < 0.0 for s in steps):
                step = max(steps)
            else:
                step = 0.0
            levels[i] = self.cusum[i].step(step)
        return levels

    def _follow_baselines(self, z: dict[tuple[int, int], float],
                          means: dict[int, float]) -> None:
        for (i, j) in z:
            if self.cusum[i].level() < SUSPECT_S and self.cusum[j].level() < SUSPECT_S \
                    and self.pair_cusum[(i, j)].level() < SUSPECT_S:
                base = self.base[(i, j)]
                self.base[(i, j)] = base + BASELINE_ALPHA * (means[i] - means[j] - base)

    def _verdict(self, present: list[int], levels: dict[int, float],
                 pair_level: float) -> Verdict:
        flags: list[str] = []
        if len(present) == 2:
            if pair_level >= CUSUM_H:
                flags.append(DRIFT + self.group)
            return Verdict({}, frozenset(), tuple(flags)) if flags else _NONE
        for i in list(self.excluded):
            if levels.get(i, self.cusum[i].level()) < SUSPECT_S:
                self.excluded.discard(i)
        for i in sorted(present, key=lambda c: -levels[c]):
            if levels[i] >= CUSUM_H:
                self.excluded.add(i)
        # Keep at least two channels: exclude the worst first.
        kept_out = [i for i in sorted(present, key=lambda c: -levels[c]) if i in self.excluded]
        kept_out = kept_out[:max(0, len(present) - 2)]
        exclude = frozenset(self.names[i] for i in kept_out)
        inflate: dict[str, float] = {}
        for i in present:
            name = self.names[i]
            if name in exclude:
                flags.append(DRIFT + name)
            elif levels[i] >= SUSPECT_S:
                inflate[name] = (levels[i] / SUSPECT_S) ** 2
                flags.append(DOWNWEIGHTED + name)
        if not flags:
            return _NONE
        return Verdict(inflate, exclude, tuple(flags))


def _mean_var(st: ChannelStats) -> float:
    """Variance of a window mean from its readings' spread (0 when unknown)."""
    if st.count > 1 and math.isfinite(st.std):
        var = st.std * st.std / st.count
        if math.isfinite(var):
            return var
    return 0.0
