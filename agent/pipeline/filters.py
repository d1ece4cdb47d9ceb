"""The per-channel filters behind ``agent.pipeline.clean``, each a small stateful object.

They run on every reading, so their state is pre-allocated when the channel is first seen and
updated in place: a fixed ring plus a sorted copy for the spike detector (median and MAD without
sorting a fresh list per reading), scalars for the rest. None of them raises on NaN, inf or huge
values; the cleaner never hands them a non-finite value, and they cope if someone does.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from typing import Final

from agent.quality import CLOCK_UNSYNCED, NOT_FINITE, OUT_OF_RANGE, RESTAMPED, UNIT

# Unit spellings drivers or bridges may use -> (canonical unit, scale, offset): v * scale + offset.
UNIT_CONVERSIONS: Final[dict[str, tuple[str, float, float]]] = {
    "°C": ("degC", 1.0, 0.0),
    "C": ("degC", 1.0, 0.0),
    "degF": ("degC", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "°F": ("degC", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": ("degC", 1.0, -273.15),
    "hPa": ("Pa", 100.0, 0.0),
    "mbar": ("Pa", 100.0, 0.0),
    "kPa": ("Pa", 1000.0, 0.0),
    "bar": ("Pa", 1e5, 0.0),
    "mV": ("V", 1e-3, 0.0),
    "uV": ("V", 1e-6, 0.0),
    "kV": ("V", 1e3, 0.0),
    "mA": ("A", 1e-3, 0.0),
    "uA": ("A", 1e-6, 0.0),
    "mW": ("W", 1e-3, 0.0),
    "kW": ("W", 1e3, 0.0),
    "kWh": ("Wh", 1e3, 0.0),
    "J": ("Wh", 1.0 / 3600.0, 0.0),
    "kHz": ("Hz", 1e3, 0.0),
    "km/h": ("m/s", 1.0 / 3.6, 0.0),
    "kph": ("m/s", 1.0 / 3.6, 0.0),
    "mph": ("m/s", 0.44704, 0.0),
    "ft/s": ("m/s", 0.3048, 0.0),
    "µg/m3": ("ug/m3", 1.0, 0.0),
    "μg/m3": ("ug/m3", 1.0, 0.0),  # Greek mu, not the micro sign
    "ug/m³": ("ug/m3", 1.0, 0.0),
    "µg/m³": ("ug/m3", 1.0, 0.0),
    "ms": ("s", 1e-3, 0.0),
}

# "%" means %RH for humidity but a fraction for power factor or occupancy.
_PERCENT: Final[dict[str, tuple[str, float, float]]] = {
    "%RH": ("%RH", 1.0, 0.0),
    "1": ("1", 0.01, 0.0),
}


def unit_conversion(unit: str, expected: str) -> tuple[str, float, float] | None:
    """How to bring ``unit`` to a canonical unit: (canonical, scale, offset), or None if unknown.

    ``expected`` is the canonical unit of the quantity ("" when not known); it only resolves
    spellings that mean different things for different quantities.
    """
    if unit == "%":
        return _PERCENT.get(expected)
    return UNIT_CONVERSIONS.get(unit)


class Hampel:
    """Spike detector: a value further than ``k`` robust sigmas from the median of the previous
    ``window`` values is a spike.

    The robust sigma is 1.4826 x MAD (consistent with the standard deviation for Gaussian
    noise), floored at ``noise`` so that a flat, quantised signal (MAD 0) does not flag every
    change of its last digit. Every finite value enters the window, spikes included: the median
    shrugs off an isolated spike, and a genuine step is accepted once it fills half the window.
    """

    __slots__ = ("_count", "_head", "_ring", "_sorted", "floor", "k", "window")

    MAD_TO_SIGMA: Final = 1.4826

    def __init__(self, window: int, k: float, noise: float = 0.0) -> None:
        if window < 3:
            raise ValueError(f"Hampel window must be at least 3 readings, got {window}")
        self.window = window
        self.k = k
        self.floor = noise
        self._ring = [0.0] * window
        self._sorted: list[float] = []
        self._head = 0
        self._count = 0

    def reset(self) -> None:
        """Forget the history, e.g. after a gap long enough that the old level means nothing."""
        self._sorted.clear()
        self._head = 0
        self._count = 0

    def is_spike(self, value: float) -> bool:
        """Judge ``value`` against the window, then add it to the window."""
        if not math.isfinite(value):
            return False  # not a spike but bad, and it must not poison the window
        spike = False
        if self._count >= self.window:
            s = self._sorted
            n = len(s)
            med = (s[(n - 1) // 2] + s[n // 2]) * 0.5
            dev = abs(value - med)
            # Within k x floor nothing is a spike, whatever the MAD: skip computing it.
            if dev > self.k * self.floor:
                scale = max(self.MAD_TO_SIGMA * self._mad(med), self.floor)
                # A zero scale (floor 0, flat history) still lets the identical value through.
                spike = dev > self.k * scale if scale > 0.0 else dev > 0.0
        self._push(value)
        return spike

    def _push(self, value: float) -> None:
        s = self._sorted
        if self._count >= self.window:
            old = self._ring[self._head]
            del s[bisect_left(s, old)]
        else:
            self._count += 1
        self._ring[self._head] = value
        self._head = (self._head + 1) % self.window
        insort(s, value)

    def median_mad(self) -> tuple[float, float]:
        """Median and MAD of the current window (NaN when it is empty)."""
        s = self._sorted
        if not s:
            return math.nan, math.nan
        med = (s[(len(s) - 1) // 2] + s[len(s) // 2]) * 0.5
        return med, self._mad(med)

    def _mad(self, med: float) -> float:
        s = self._sorted
        n = len(s)
        lo_i = (n - 1) // 2
        hi_i = n // 2
        # The absolute deviations, in ascending order, are two monotone runs: walking left from
        # the median and right from it. Merge them up to the middle rank to get the MAD without
        # building a list.
        left = lo_i
        right = lo_i + 1
        lo_dev = hi_dev = 0.0
        for rank in range(hi_i + 1):
            if right >= n or (left >= 0 and med - s[left] <= s[right] - med):
                dev = med - s[left]
                left -= 1
            else:
                dev = s[right] - med
                right += 1
            if rank == lo_i:
                lo_dev = dev
            hi_dev = dev
        return (lo_dev + hi_dev) * 0.5


class Stuck:
    """Flags a channel whose value repeats exactly ``count`` times in a row (and after)."""

    __slots__ = ("changes", "count", "last", "run")

    def __init__(self, count: int) -> None:
        if count < 2:
            raise ValueError(f"stuck count must be at least 2 readings, got {count}")
        self.count = count
        self.last = math.nan
        self.run = 0
        self.changes = 0  # values that differed from the previous one

    def is_stuck(self, value: float) -> bool:
        if value == self.last:
            self.run += 1
        else:
            self.last = value
            self.run = 1
            self.changes += 1
        return self.run >= self.count


class RateLimit:
    """Flags a change faster than ``max_rate`` units per second from the last good value.

    The reference is the last value that passed every check, and the allowed change grows with
    the time since it: a genuine step is flagged for ``step / max_rate`` seconds and then
    accepted, while a spike's return to normal is not mistaken for a second jump. Time is the
    monotonic clock, so a wall-clock step cannot fake a rate.
    """

    __slots__ = ("has_ref", "max_rate_per_ns", "ref_mono_ns", "ref_value")

    def __init__(self, max_rate: float) -> None:
        self.max_rate_per_ns = max_rate * 1e-9
        self.has_ref = False
        self.ref_value = 0.0
        self.ref_mono_ns = 0

    def reset(self) -> None:
        self.has_ref = False

    def too_fast(self, value: float, mono_ns: int) -> bool:
        if not self.has_ref:
            return False
        # A reading older than the reference (delivered out of order) is judged on the same
        # terms: the time between them bounds the change.
        dt = mono_ns - self.ref_mono_ns
        if dt <= 0:
            if dt == 0:
                return value != self.ref_value
            dt = -dt
        return abs(value - self.ref_value) > self.max_rate_per_ns * dt

    def accept(self, value: float, mono_ns: int) -> None:
        """Make ``value`` the reference, unless an accepted reading is newer; called for
        readings that passed every check."""
        if self.has_ref and mono_ns < self.ref_mono_ns:
            return
        self.has_ref = True
        self.ref_value = value
        self.ref_mono_ns = mono_ns


# Reason codes (``agent.quality``). Bad: the value is wrong. Suspect: the value may be wrong.
# Time reasons say nothing about the value, only about its timestamp.

BAD_REASONS: Final = frozenset({NOT_FINITE, OUT_OF_RANGE, UNIT})
TIME_REASONS: Final = frozenset({CLOCK_UNSYNCED, RESTAMPED})


def value_usable(quality: str, reasons: tuple[str, ...]) -> bool:
    """Whether a reading's value belongs in aggregates: good, or suspect only about its time."""
    if quality == "good":
        return True
    if quality == "bad" or not reasons:
        return False
    return TIME_REASONS.issuperset(reasons)
