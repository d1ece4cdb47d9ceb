"""A long clock hold, then NTP: every re-stamped window that is complete comes out without the
``partial`` flag, and every reading lands in its true window (reference: the true times)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.clean import Cleaner
from agent.pipeline.windows import Windower
from agent.readings import Reading, Window
from tests.test_clocksync import DAY, TRUE_T0, HostTime, clock_for

S = 10**9
MS = 10**6


def test_a_120_s_hold_leaves_no_complete_window_flagged_partial() -> None:
    host = HostTime(TRUE_T0 - 3 * DAY, 1000 * S)  # the host clock starts 3 days behind
    clock = clock_for(host, check_interval_s=0.0)
    sensors = [SensorConfig(name=n, driver="synthetic", period_s=1.0) for n in ("a", "b")]
    streams = [StreamConfig(name="env", sensors=["a", "b"], window_s=10)]
    cleaner = Cleaner(sensors, clock)
    windower = Windower(streams, sensors, clock=clock)
    mono0 = host.mono_now
    truth: dict[tuple[int, str], list[float]] = defaultdict(list)  # (true start, sensor)
    out: list[Window] = []
    step_ms = 100
    for k in range(round(150 * S / (step_ms * MS))):  # 150 s at 100 ms steps
        t_ns = k * step_ms * MS
        host.mono_now = mono0 + t_ns
        if t_ns == 120 * S:
            host.ntp_step(TRUE_T0 + 120 * S)
        for sensor, phase_ms in (("a", 0), ("b", 300)):
            if (t_ns - phase_ms * MS) % S:
                continue
            value = 20.0 + 0.001 * k + (0.5 if sensor == "b" else 0.0)
            raw = Reading(sensor, "temperature", value, "degC", clock.wall_ns(), clock.mono_ns())
            cleaned = cleaner.process(raw)
            assert cleaned is not None
            windower.add(cleaned)
            true_ts = TRUE_T0 + t_ns
            truth[(true_ts - true_ts % (10 * S), sensor)].append(value)
        out += windower.close_due(clock.wall_ns(), 200 * MS)
    out += windower.flush()

    assert windower.stats()["restamped"] == 2 * 120
    complete = 0
    for w in out:
        for sensor in ("a", "b"):
            st = w.channels[f"{sensor}.temperature"]
            ref = truth[(w.start_ns, sensor)]
            assert st.count == len(ref)
            assert st.mean == np.mean(ref) or abs(st.mean - np.mean(ref)) < 1e-12
        full = all(len(truth[(w.start_ns, s)]) == 10 for s in ("a", "b"))
        if full and w.end_ns <= TRUE_T0 + 140 * S:
            complete += 1
            assert "partial" not in w.flags, ((w.start_ns - TRUE_T0) // S, w.flags)
    assert complete == 14
    assert sum(st.count for w in out for st in w.channels.values()) == 2 * 150
