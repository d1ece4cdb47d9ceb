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


def _step(up: float, down: float, z: float) -> tuple[float, float]:
    """One two-sided CUSUM step, capped so that a channel that comes back is trusted again
    within a few windows however long it was off."""
    up += z - CUSUM_K
    down -= z + CUSUM_K
    return (0.0 if up < 0.0 else min(up, CUSUM_MAX),
            0.0 if down < 0.0 else min(down, CUSUM_MAX))


class DriftMonitor:
    """The cross-window state of one fuse group; ``update`` once per window, in time order.

    State lives in flat lists indexed by channel and by pair: this runs for every group on
    every window, beside the readings' hot path."""

    def __init__(self, group: str, members: Sequence[Member]) -> None:
        self.group = group
        self.names = [m.channel for m in members]
        n = len(members)
        self.n = n
        self.pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        # The floors' part of each pair's scale (squared): it does not change.
        self.pair_floor2 = [(SCALE_FRACTION * members[i].sigma_floor) ** 2
                            + (SCALE_FRACTION * members[j].sigma_floor) ** 2
                            for i, j in self.pairs]
        # Channel -> (pair index, +1 when it is the pair's first channel, else -1).
        self.chan_pairs: list[list[tuple[int, float]]] = [
            [(k, 1.0 if a == i else -1.0) for k, (a, b) in enumerate(self.pairs) if i in (a, b)]
            for i in range(n)]
        self.base: list[float | None] = [None] * len(self.pairs)
        self.pair_up = [0.0] * len(self.pairs)
        self.pair_down = [0.0] * len(self.pairs)
        self.up = [0.0] * n
        self.down = [0.0] * n
        self.excluded: set[int] = set()

    def level(self, i: int) -> float:
        """The CUSUM level of channel ``i`` (index in the group)."""
        return max(self.up[i], self.down[i])

    def update(self, channels: Mapping[str, ChannelStats]) -> Verdict:
        n = self.n
        means: list[float | None] = [None] * n
        spread = [0.0] * n
        present: list[int] = []
        for i, name in enumerate(self.names):
            st = channels.get(name)
            if st is not None and st.count > 0 and math.isfinite(st.mean):
                present.append(i)
                means[i] = st.mean
                spread[i] = _mean_var(st)
        if len(present) < 2:
            return _NONE
        z: list[float | None] = [None] * len(self.pairs)
        for k, (i, j) in enumerate(self.pairs):
            mi, mj = means[i], means[j]
            if mi is None or mj is None:
                continue
            diff = mi - mj
            base = self.base[k]
            if base is None:
                base = self.base[k] = diff
            scale = math.sqrt(self.pair_floor2[k] + spread[i] + spread[j])
            zp = (diff - base) / scale if scale > 0.0 else 0.0
            if not (-Z_REBASE <= zp <= Z_REBASE):  # NaN too
                # No drift moves this far: a broken reading or a swapped sensor, which the
                # per-window check flags. Start the pair's history again from here.
                self.base[k] = diff if math.isfinite(diff) else None
                continue
            zk = Z_CAP if zp > Z_CAP else (-Z_CAP if zp < -Z_CAP else zp)
            z[k] = zk
            self.pair_up[k], self.pair_down[k] = _step(self.pair_up[k], self.pair_down[k], zk)
        if len(present) >= 3:
            self._channel_steps(present, z)
        self._follow_baselines(z, means)
        return self._verdict(present, z)

    def _channel_steps(self, present: list[int], z: list[float | None]) -> None:
        """A channel's step: its pair departure of smallest size, when all its pairs depart the
        same way (a drifting channel departs from every other; its peers only from it)."""
        for i in present:
            lo = math.inf
            hi = -math.inf
            for k, sign in self.chan_pairs[i]:
                zk = z[k]
                if zk is None:
                    continue
                s = zk * sign
                lo = min(lo, s)
                hi = max(hi, s)
            if lo == math.inf:
                continue
            step = lo if lo > 0.0 else (hi if hi < 0.0 else 0.0)
            self.up[i], self.down[i] = _step(self.up[i], self.down[i], step)

    def _follow_baselines(self, z: list[float | None], means: list[float | None]) -> None:
        for k, (i, j) in enumerate(self.pairs):
            mi, mj, base = means[i], means[j], self.base[k]
            if z[k] is None or mi is None or mj is None or base is None:
                continue
            if self.level(i) < SUSPECT_S and self.level(j) < SUSPECT_S \
                    and max(self.pair_up[k], self.pair_down[k]) < SUSPECT_S:
                self.base[k] = base + BASELINE_ALPHA * (mi - mj - base)

    def _verdict(self, present: list[int], z: list[float | None]) -> Verdict:
        if len(present) == 2:
            i, j = present
            k = self.pairs.index((i, j))
            if z[k] is not None and max(self.pair_up[k], self.pair_down[k]) >= CUSUM_H:
                return Verdict({}, frozenset(), (DRIFT + self.group,))
            return _NONE
        levels = {i: self.level(i) for i in present}
        if not self.excluded and max(levels.values()) < SUSPECT_S:
            return _NONE  # the common case: every channel in line
        for i in list(self.excluded):
            if self.level(i) < SUSPECT_S:
                self.excluded.discard(i)
        worst_first = sorted(present, key=lambda c: -levels[c])
        for i in worst_first:
            if levels[i] >= CUSUM_H:
                self.excluded.add(i)
        # Keep at least two channels: exclude the worst first.
        kept_out = [i for i in worst_first if i in self.excluded][:max(0, len(present) - 2)]
        exclude = frozenset(self.names[i] for i in kept_out)
        flags: list[str] = []
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
