"""The synthetic sensor as a load generator: a burst reads the clock once, its samples are
spread over the time since the previous burst, and times only grow, however late the loop."""

from __future__ import annotations

import math

import pytest

from drivers.synthetic import SyntheticSensor


class StepClock:
    def __init__(self) -> None:
        self.mono = 5_000_000_000
        self.reads = 0

    def wall_ns(self) -> int:
        self.reads += 1
        return self.mono + 1_700_000_000_000_000_000

    def mono_ns(self) -> int:
        self.reads += 1
        return self.mono

    def synced(self) -> bool:
        return True


async def test_bursts_are_spread_increasing_and_cheap_on_the_clock() -> None:
    clock = StepClock()
    s = SyntheticSensor("g", clock, 0.01, {"burst": 50, "cycle_s": 1.0, "amplitude": 2.0})
    seen: list[int] = []
    # On time, late by 3 periods, then twice within 1 us (a loop that fell far behind).
    for advance in (0, 10_000_000, 30_000_000, 1_000, 0):
        clock.mono += advance
        reads = clock.reads
        burst = await s.sample()
        assert clock.reads - reads == 2  # one wall and one monotonic read per burst
        assert len(burst) == 50
        seen += [r.mono_ns for r in burst]
        assert all(r.ts_ns - r.mono_ns == 1_700_000_000_000_000_000 for r in burst)
        assert [r.value for r in burst] == pytest.approx(
            [20.0 + 2.0 * math.sin(2 * math.pi * r.mono_ns / 1e9) for r in burst], abs=1e-9)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    # At most one period back: a late burst does not reach into the previous one's time.
    assert seen[50] > seen[49] and seen[99] - seen[50] <= 10_000_000


async def test_faults_still_apply_to_a_burst() -> None:
    clock = StepClock()
    s = SyntheticSensor("g", clock, 0.01, {"burst": 20, "spike_every": 5, "spike_size": 100.0,
                                           "dropout_every": 7, "dropout_len": 2})
    burst = await s.sample()
    assert len(burst) == 20 - 4  # readings 7, 8, 14 and 15 dropped out
    assert sum(r.value > 50 for r in burst) == 3  # 5, 10 and 20 spike; 15 dropped out
