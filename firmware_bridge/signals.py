"""What the emulated MCU measures: vehicles over an inductive loop and S0 pulses of a meter.

Both are functions of an injected time (seconds, epoch-like so the hour of day shapes the
signal) and a seed, so a test can replay them exactly.

- Loop detector: vehicles arrive as a Poisson process whose rate follows a weekday profile
  (morning and evening peaks). A vehicle occupies the loop for (vehicle length + loop length) /
  speed; the detector cannot separate vehicles closer than ``MIN_GAP_S``, so occupied intervals
  never overlap.
- Pulse counter: a load drawing ``base_w`` plus a daytime bump and slow noise; the meter emits
  one pulse per ``1000 / pulses_per_kwh`` Wh (an S0 output, IEC 62053-31).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

LOOP_LENGTH_M = 2.0  # a common 2 m x 2 m loop
MIN_GAP_S = 0.3  # two vehicles closer than this read as one long one
SECONDS_PER_DAY = 86_400.0


def weekday_profile(t_s: float) -> float:
    """Relative traffic at time ``t_s`` (0..~1): morning and evening peaks, quiet nights."""
    hour = (t_s % SECONDS_PER_DAY) / 3600.0
    morning = math.exp(-(((hour - 8.0) / 1.5) ** 2))
    evening = 0.9 * math.exp(-(((hour - 17.5) / 2.0) ** 2))
    day = 0.35 if 6.0 <= hour <= 21.0 else 0.0
    return min(1.0, 0.05 + day + 0.6 * (morning + evening))


@dataclass(frozen=True, slots=True)
class Interval:
    count: int  # events that started in the interval
    total: int  # events since the channel started, modulo 2**32
    occupancy_us: int  # time occupied within the interval (loop only)


class LoopDetector:
    def __init__(self, start_s: float, *, peak_veh_h: float = 900.0, seed: int = 0) -> None:
        self.peak_veh_h = peak_veh_h
        self._rng = random.Random(seed)
        self._last_s = start_s
        self._next_arrival = start_s
        self._vehicles: deque[tuple[float, float]] = deque()  # (arrival_s, leave_s)
        self._draw_next()
        self.total = 0

    def _draw_next(self) -> None:
        # Thinning: candidates at the peak rate, kept with probability profile(t).
        rate_per_s = self.peak_veh_h / 3600.0
        t = self._next_arrival
        while True:
            t += self._rng.expovariate(rate_per_s)
            if self._rng.random() <= weekday_profile(t):
                break
        if self._vehicles:
            t = max(t, self._vehicles[-1][1] + MIN_GAP_S)
        length_m = 12.0 if self._rng.random() < 0.1 else self._rng.uniform(3.8, 5.2)
        speed_ms = max(2.0, self._rng.gauss(13.9, 2.5))
        self._next_arrival = t
        self._vehicles.append((t, t + (length_m + LOOP_LENGTH_M) / speed_ms))

    def advance(self, now_s: float) -> Interval:
        start, self._last_s = self._last_s, max(self._last_s, now_s)
        end = self._last_s
        while self._next_arrival <= end:
            self._draw_next()
        count = 0
        occupied = 0.0
        for arrival, leave in self._vehicles:
            if start < arrival <= end:
                count += 1
            occupied += max(0.0, min(leave, end) - max(arrival, start))
        while self._vehicles and self._vehicles[0][1] <= end:
            self._vehicles.popleft()
        self.total = (self.total + count) & 0xFFFFFFFF
        return Interval(count, self.total, round(occupied * 1e6))


class PulseCounter:
    def __init__(self, start_s: float, *, pulses_per_kwh: float = 1000.0, base_w: float = 180.0,
                 peak_w: float = 900.0, seed: int = 0) -> None:
        self.pulses_per_kwh = pulses_per_kwh
        self.base_w = base_w
        self.peak_w = peak_w
        self._rng = random.Random(seed)
        self._last_s = start_s
        self._noise_w = 0.0
        self._fraction = 0.0
        self.total = 0

    def power_w(self, t_s: float) -> float:
        return max(0.0, self.base_w + self.peak_w * weekday_profile(t_s) + self._noise_w)

    def advance(self, now_s: float) -> Interval:
        start, self._last_s = self._last_s, max(self._last_s, now_s)
        dt = self._last_s - start
        # A slow random walk, pulled back to zero, stands for appliances switching.
        self._noise_w = 0.98 * self._noise_w + self._rng.gauss(0.0, 0.05 * self.base_w)
        energy_wh = self.power_w(start + dt / 2) * dt / 3600.0
        self._fraction += energy_wh * self.pulses_per_kwh / 1000.0
        count = int(self._fraction)
        self._fraction -= count
        self.total = (self.total + count) & 0xFFFFFFFF
        return Interval(count, self.total, 0)
