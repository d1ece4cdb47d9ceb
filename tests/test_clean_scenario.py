"""A generated signal with injected spike, stuck and dropout faults, through clean and windows."""

from __future__ import annotations

import dataclasses

from agent.config.cleaning import CleanOptions
from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.clean import Cleaner
from agent.pipeline.clocksync import ClockSync
from agent.pipeline.windows import Windower
from agent.readings import Window
from drivers.synthetic import SyntheticSensor

S = 10**9
T0 = 1_800_000_000 * S  # a multiple of the 30 s window
MONO0 = 500 * S


class Host:
    def __init__(self) -> None:
        self.mono_now = MONO0

    def wall(self) -> int:
        return T0 + self.mono_now - MONO0

    def mono(self) -> int:
        return self.mono_now


async def test_spike_stuck_and_dropout_leave_the_right_counts_and_values() -> None:
    host = Host()
    clock = ClockSync(lambda _wall: True, wall=host.wall, mono=host.mono)
    cfg = SensorConfig(name="env", driver="synthetic", period_s=1.0,
                       options={"base": 20.0, "amplitude": 1.0, "cycle_s": 600.0},
                       clean={"temperature": CleanOptions(stuck_count=5)})
    sensor = SyntheticSensor(cfg.name, clock, cfg.period_s, dict(cfg.options))
    await sensor.open()
    cleaner = Cleaner([cfg], clock)
    windower = Windower([StreamConfig(name="env", sensors=["env"], window_s=30)], [cfg],
                        clock=clock)

    spike_at, stuck_from, stuck_to, gap_from, gap_to = 20, 32, 41, 45, 54
    windows: list[Window] = []
    stale_during_gap: list[str] = []
    last_value = 0.0
    for t in range(60):
        host.mono_now = MONO0 + t * S
        if gap_from <= t <= gap_to:  # dropout: the sensor says nothing
            if t == gap_to:
                stale_during_gap = cleaner.stale(clock.mono_ns())
            continue
        (raw,) = await sensor.sample()
        if t == spike_at:
            raw = dataclasses.replace(raw, value=raw.value + 8.0)
        elif stuck_from < t <= stuck_to:
            raw = dataclasses.replace(raw, value=last_value)  # frozen at the value of t = 32
        out = cleaner.process(raw)
        assert out is not None
        last_value = raw.value
        windower.add(out)
        windows += windower.close_due(clock.wall_ns(), 0)
    windows += windower.flush()

    first, second = windows
    a, b = first.channels["env.temperature"], second.channels["env.temperature"]
    # Window 0..30 s: the spike is the one suspect reading, and left out of min/max/mean.
    assert (a.count, a.suspect, a.bad) == (29, 1, 0)
    assert a.max < 21.0
    # Window 30..60 s: 10 identical readings, the 5th and later are stuck (6); 10 s of dropout.
    assert (b.count, b.suspect, b.bad) == (30 - 10 - 6, 6, 0)
    assert stale_during_gap == ["env.temperature"]
    counters = cleaner.counters("env.temperature")
    assert counters["reasons"]["spike"] == 1
    assert counters["reasons"]["stuck"] == 6
    assert counters["good"] == 29 + 14
    assert first.flags == () and second.flags == ("partial",)
