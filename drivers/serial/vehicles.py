"""Vehicles from a Doppler radar's speed reports, on the host (pure: times are arguments).

A radar reports the speed of whatever moves in its beam, many times a second, signed:
positive approaching (inbound), negative receding (outbound). A *target* is a run of
same-sign reports whose speed is inside the window ``[min_speed, max_speed]``; it ends after
``gap_s`` without a report of its sign, and counts as a vehicle if the run lasted at least
``min_duration_s`` (shorter runs are pedestrians, birds, rain, a door: counted as rejected).

Inbound and outbound targets are tracked separately, so two vehicles passing each other in
the radar's beam are two vehicles. The vehicle's speed is the largest |speed| of its run: the
Doppler shift shrinks with the cosine of the angle to the beam, which is smallest far away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["in", "out"]

GAP_S = 0.75
MIN_DURATION_S = 0.1
_EPS_S = 1e-9  # so 1.3 - 1.2 counts as 0.1 s


@dataclass(frozen=True, slots=True)
class Vehicle:
    direction: Direction
    speed_mps: float  # max |speed| over the run
    start_s: float
    end_s: float  # time of the last report
    reports: int

    @property
    def quantity(self) -> str:
        return f"speed_{self.direction}"


@dataclass
class _Run:
    start_s: float
    last_s: float
    peak: float
    reports: int


class VehicleDetector:
    def __init__(
        self,
        *,
        min_speed_mps: float = 0.0,
        max_speed_mps: float = float("inf"),
        min_duration_s: float = MIN_DURATION_S,
        gap_s: float = GAP_S,
    ) -> None:
        if not 0 <= min_speed_mps < max_speed_mps:
            raise ValueError(
                f"speed window [{min_speed_mps}, {max_speed_mps}] m/s is empty or negative"
            )
        if gap_s <= 0 or min_duration_s < 0:
            raise ValueError("gap_s must be positive and min_duration_s not negative")
        self.min_speed = min_speed_mps
        self.max_speed = max_speed_mps
        self.min_duration_s = min_duration_s
        self.gap_s = gap_s
        self._runs: dict[Direction, _Run] = {}
        self.outside_window = 0
        self.rejected = 0

    def feed(self, t_s: float, speed_mps: float) -> list[Vehicle]:
        """One report at time ``t_s``; returns the vehicles whose runs ended before it."""
        out = self.flush(t_s)
        magnitude = abs(speed_mps)
        if speed_mps == 0 or not self.min_speed <= magnitude <= self.max_speed:
            self.outside_window += 1
            return out
        direction: Direction = "in" if speed_mps > 0 else "out"
        run = self._runs.get(direction)
        if run is None:
            self._runs[direction] = _Run(t_s, t_s, magnitude, 1)
        else:
            run.last_s = max(run.last_s, t_s)
            run.peak = max(run.peak, magnitude)
            run.reports += 1
        return out

    def flush(self, t_s: float) -> list[Vehicle]:
        """Close the runs that have been quiet for ``gap_s`` at time ``t_s``."""
        out: list[Vehicle] = []
        for direction in ("in", "out"):
            run = self._runs.get(direction)
            if run is not None and t_s - run.last_s >= self.gap_s:
                del self._runs[direction]
                vehicle = self._close(direction, run)
                if vehicle is not None:
                    out.append(vehicle)
        out.sort(key=lambda v: v.end_s)
        return out

    def finish(self) -> list[Vehicle]:
        """Close every open run now (end of a recording)."""
        out = [v for d, r in sorted(self._runs.items()) if (v := self._close(d, r)) is not None]
        self._runs.clear()
        return sorted(out, key=lambda v: v.end_s)

    def next_deadline(self) -> float | None:
        """When the earliest open run will end if no report comes, or None."""
        if not self._runs:
            return None
        return min(r.last_s for r in self._runs.values()) + self.gap_s

    def _close(self, direction: Direction, run: _Run) -> Vehicle | None:
        if run.last_s - run.start_s < self.min_duration_s - _EPS_S:
            self.rejected += 1
            return None
        return Vehicle(direction, run.peak, run.start_s, run.last_s, run.reports)
