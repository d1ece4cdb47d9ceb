"""What the cleaner remembers of a channel: repeats further back than the previous reading,
out-of-order delivery, and spike references across short gaps; checked through the public
Cleaner and Windower against references computed independently here."""

from __future__ import annotations

import random

import numpy as np
import pytest

from agent.clock import SystemClock
from agent.config.cleaning import resolve
from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.clean import Cleaner
from agent.pipeline.windows import Windower
from agent.readings import Reading, Window

S = 10**9
T0 = 1_800_000_000 * S
MONO0 = 100 * S


def cfg(period_s: float = 1.0) -> SensorConfig:
    return SensorConfig(name="m", driver="synthetic", period_s=period_s)


def reading(quantity: str, unit: str, value: float, t_ns: int) -> Reading:
    return Reading("m", quantity, value, unit, T0 + t_ns, MONO0 + t_ns)


@pytest.mark.parametrize("back", [2, 10, 64, 100])
def test_repeats_up_to_many_readings_back_are_dropped_and_counted(back: int) -> None:
    rng = random.Random(back)
    # Power has no rate check: before, a repeat that was not adjacent went in as good.
    unique = [reading("power", "W", 100.0 + rng.gauss(0, 5), i * S) for i in range(300)]
    stream: list[Reading] = []
    repeats = 0
    for i, r in enumerate(unique):
        stream.append(r)
        if i >= back and i % 7 == 0:
            stream.append(unique[i - back])  # re-sent: same channel and timestamp
            repeats += 1
    cleaner = Cleaner([cfg()], SystemClock())
    w = Windower([StreamConfig(name="s", sensors=["m"], window_s=10)], [cfg()], max_open=64)
    for r in stream:
        out = cleaner.process(r)
        if out is not None:
            w.add(out)
    windows = w.flush()
    assert cleaner.counters("m.power")["dropped"] == {"duplicate": repeats}
    assert cleaner.counters("m.power")["good"] == len(unique)
    values = np.array([r.value for r in unique])
    for x in windows:
        k = (x.start_ns - T0) // (10 * S)
        ref = values[k * 10:(k + 1) * 10]
        st = x.channels["m.power"]
        assert st.count == len(ref)
        assert st.mean == pytest.approx(float(np.mean(ref)), rel=1e-12)
    assert sum(x.channels["m.power"].count for x in windows) == len(unique)


def test_the_stale_limit_is_exact_for_periods_like_0_3_s() -> None:
    assert resolve("temperature", 0.3, None).stale_ns == 900_000_000
    cleaner = Cleaner([cfg(0.3)], SystemClock())
    cleaner.process(reading("temperature", "degC", 20.0, 0))
    assert cleaner.stale(MONO0 + 900_000_000) == []  # exactly 3 periods: not yet
    assert cleaner.stale(MONO0 + 900_000_001) == ["m.temperature"]


def pm_series(rng: random.Random, n: int) -> list[float]:
    return [12.0 + rng.gauss(0.0, 1.0) for _ in range(n)]


def test_a_spike_soon_after_a_short_gap_is_caught() -> None:
    rng = random.Random(5)
    cleaner = Cleaner([cfg()], SystemClock())
    t = 0
    for v in pm_series(rng, 30):
        out = cleaner.process(reading("pm2_5", "ug/m3", v, t))
        assert out is not None and out.quality == "good"
        t += S
    t += 5 * S  # the sensor says nothing for 5 s (stale after 3)
    for v in pm_series(rng, 3):
        out = cleaner.process(reading("pm2_5", "ug/m3", v, t))
        assert out is not None and out.quality == "good"
        t += S
    spike = cleaner.process(reading("pm2_5", "ug/m3", 400.0, t))
    assert spike is not None
    assert spike.quality == "suspect" and "spike" in spike.reasons


def test_after_a_long_gap_a_new_level_is_accepted() -> None:
    rng = random.Random(6)
    cleaner = Cleaner([cfg()], SystemClock())
    for i, v in enumerate(pm_series(rng, 30)):
        cleaner.process(reading("pm2_5", "ug/m3", v, i * S))
    later = cleaner.process(reading("pm2_5", "ug/m3", 150.0, 3600 * S))
    assert later is not None and later.quality == "good"


def test_an_out_of_order_reading_is_aggregated_not_flagged_rate() -> None:
    cleaner = Cleaner([cfg()], SystemClock())
    w = Windower([StreamConfig(name="s", sensors=["m"], window_s=10)], [cfg()])
    values = [20.0 + 0.5 * i for i in range(10)]  # 0.5 degC/s: within the 3 degC/s rate limit
    order = [0, 1, 2, 3, 4, 6, 5, 7, 8, 9]  # reading 5 delivered after reading 6
    for i in order:
        out = cleaner.process(reading("temperature", "degC", values[i], i * S))
        assert out is not None
        assert out.quality == "good", (i, out.reasons)
        w.add(out)
    (win,) = w.flush()
    st = win.channels["m.temperature"]
    assert st.count == 10
    assert st.mean == pytest.approx(float(np.mean(values)), rel=1e-12)
    assert st.last == values[9]  # the newest, not the last delivered


def test_an_out_of_order_reading_for_a_closed_window_is_counted_late() -> None:
    cleaner = Cleaner([cfg()], SystemClock())
    w = Windower([StreamConfig(name="s", sensors=["m"], window_s=10)], [cfg()])
    closed: list[Window] = []
    for i in [*range(9), 10, 11, 9]:  # reading 9 arrives after its window closed
        out = cleaner.process(reading("temperature", "degC", 20.0 + 0.1 * i, i * S))
        assert out is not None and out.quality == "good"
        w.add(out)
        closed += w.close_due(T0 + (i + 1) * S, 0)
    assert [x.channels["m.temperature"].count for x in closed] == [9]
    assert w.late("s") == 1
    # A value far outside what the rate allows is still flagged, whatever the order.
    far = cleaner.process(reading("temperature", "degC", 60.0, 9 * S + S // 2))
    assert far is not None and "rate" in far.reasons
