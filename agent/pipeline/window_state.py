"""The running state of open windows: per-channel aggregates and the power carry.

Nothing per reading is kept: ``ChannelAcc`` adds each usable value to running sums (kept relative
to the first value, so the variance of a large, steady signal does not cancel away) and to the
power integral; ``PowerCarry`` is the last power sample, the left end of the next trapezoid.
"""

from __future__ import annotations

import math

from agent.readings import ChannelStats

_NAN = math.nan


class ChannelAcc:
    """Running aggregates of one channel in one window. Sums are kept relative to the first
    value, so the variance of a large, steady signal (pressure in Pa) does not cancel away."""

    __slots__ = ("area", "bad", "covered", "last", "last_ts", "max", "min", "n", "s1", "s2",
                 "shift", "suspect", "unit")

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.n = 0
        self.shift = 0.0
        self.s1 = 0.0
        self.s2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.last = _NAN
        self.last_ts = -(1 << 62)
        self.suspect = 0
        self.bad = 0
        self.area = 0.0  # power x time, W ns
        self.covered = 0  # ns bridged by the integral

    def add(self, v: float, ts: int) -> None:
        n = self.n
        if n == 0:
            self.shift = v
        d = v - self.shift
        self.s1 += d
        self.s2 += d * d
        self.n = n + 1
        # Branches, not min()/max(): a call costs more on the per-reading path.
        if v < self.min:  # noqa: PLR1730
            self.min = v
        if v > self.max:  # noqa: PLR1730
            self.max = v
        if ts >= self.last_ts:
            self.last = v
            self.last_ts = ts

    def stats(self) -> ChannelStats:
        n = self.n
        if n == 0:
            return ChannelStats(0, _NAN, _NAN, _NAN, _NAN, _NAN, self.unit, self.suspect, self.bad)
        mean = self.shift + self.s1 / n
        if self.min <= self.max:
            mean = min(max(mean, self.min), self.max)
        std = 0.0
        if n > 1:
            var = (self.s2 - self.s1 * self.s1 / n) / (n - 1)
            std = math.sqrt(var) if var > 0.0 else (_NAN if math.isnan(var) else 0.0)
        return ChannelStats(n, mean, self.min, self.max, self.last, std, self.unit,
                            self.suspect, self.bad)


class PowerCarry:
    """The last usable power sample of a channel, the left end of the next trapezoid."""

    __slots__ = ("t", "v")

    def __init__(self, t: int, v: float) -> None:
        self.t = t
        self.v = v


class OpenWindow:
    __slots__ = ("chans", "end", "flags", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.chans: dict[str, dict[str, ChannelAcc]] = {}
        self.flags: set[str] = set()
