"""Each filter on hand-made sequences, alone and through the Cleaner."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.clock import SystemClock
from agent.config.cleaning import DEFAULTS, CleanOptions, resolve
from agent.config.schema import SensorConfig
from agent.pipeline.clean import Cleaner
from agent.pipeline.filters import Hampel, RateLimit, Stuck, unit_conversion
from agent.readings import Reading

T0 = 1_800_000_000 * 10**9
S = 10**9


def sensor(name: str = "env", period_s: float = 1.0, **clean: CleanOptions) -> SensorConfig:
    return SensorConfig(name=name, driver="synthetic", period_s=period_s, clean=clean)


def sensor_with(quantity: str, opts: CleanOptions) -> SensorConfig:
    return SensorConfig(name="env", driver="synthetic", clean={quantity: opts})


def reading(value: float, i: int, *, quantity: str = "temperature", unit: str = "degC",
            name: str = "env", step_ns: int = S) -> Reading:
    return Reading(name, quantity, value, unit, T0 + i * step_ns, 5 * S + i * step_ns)


def run(cleaner: Cleaner, values: list[float], **kw: object) -> list[Reading]:
    out = []
    for i, v in enumerate(values):
        r = cleaner.process(reading(v, i, **kw))  # type: ignore[arg-type]
        assert r is not None
        out.append(r)
    return out


# -- Hampel ------------------------------------------------------------------------------------

def test_hampel_median_and_mad_match_statistics() -> None:
    h = Hampel(5, 3.0)
    for v in [3.0, 1.0, 4.0, 1.0, 5.0]:
        h.is_spike(v)
    med, mad = h.median_mad()
    data = [3.0, 1.0, 4.0, 1.0, 5.0]
    assert med == statistics.median(data)
    assert mad == statistics.median(abs(x - med) for x in data)


@given(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=40), st.integers(3, 12))
def test_hampel_window_statistics_match_a_naive_recomputation(values: list[float], w: int) -> None:
    h = Hampel(w, 3.0)
    for v in values:
        h.is_spike(v)
    window = values[-w:]
    med, mad = h.median_mad()
    assert med == pytest.approx(statistics.median(window))
    assert mad == pytest.approx(statistics.median(abs(x - med) for x in window), abs=1e-6)


def test_hampel_flags_an_isolated_spike_and_accepts_a_step_after_half_a_window() -> None:
    h = Hampel(7, 3.0, noise=0.1)
    base = [20.0, 20.1, 19.9, 20.0, 20.05, 19.95, 20.0]
    assert [h.is_spike(v) for v in base] == [False] * 7
    assert h.is_spike(35.0)  # spike
    assert not h.is_spike(20.02)  # back to normal
    step = [h.is_spike(30.0) for _ in range(6)]
    # The first readings at the new level look like spikes until they are half the window.
    assert step[0] and step[1]
    assert not step[-1]


def test_hampel_noise_floor_keeps_a_quantised_flat_signal_quiet() -> None:
    flat = Hampel(5, 3.0, noise=0.01)
    for _ in range(5):
        flat.is_spike(20.0)
    assert not flat.is_spike(20.01)  # one quantisation step: not a spike
    assert flat.is_spike(20.5)
    bare = Hampel(5, 3.0)
    for _ in range(5):
        bare.is_spike(20.0)
    assert bare.is_spike(20.01)  # without a floor, a flat history makes any change a spike


def test_hampel_reset_and_rejects_small_windows() -> None:
    h = Hampel(3, 3.0)
    for v in (1.0, 1.0, 1.0):
        h.is_spike(v)
    h.reset()
    assert not h.is_spike(100.0)  # no history: nothing to judge against
    with pytest.raises(ValueError, match="at least 3"):
        Hampel(2, 3.0)


# -- stuck, rate, units ------------------------------------------------------------------------

def test_stuck_flags_from_the_nth_identical_reading() -> None:
    s = Stuck(3)
    flags = [s.is_stuck(v) for v in (1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0)]
    assert flags == [False, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="at least 2"):
        Stuck(1)


def test_rate_limit_grows_with_time_since_the_last_good_value() -> None:
    r = RateLimit(1.0)  # 1 unit/s
    assert not r.too_fast(10.0, 0)  # no reference yet
    r.accept(10.0, 0)
    assert not r.too_fast(10.9, S)
    assert r.too_fast(12.0, S)
    assert not r.too_fast(12.0, 3 * S)  # the same step is believable after 2 s
    assert r.too_fast(10.1, 0)  # same instant, different value


def test_unit_conversions() -> None:
    def conv(value: float, unit: str, expected: str) -> tuple[float, str]:
        c = unit_conversion(unit, expected)
        assert c is not None
        return value * c[1] + c[2], c[0]

    assert conv(1013.25, "hPa", "Pa") == pytest.approx((101325.0, "Pa"))
    assert conv(250.0, "mV", "V") == pytest.approx((0.25, "V"))
    assert conv(36.0, "km/h", "m/s") == pytest.approx((10.0, "m/s"))
    assert conv(212.0, "degF", "degC") == pytest.approx((100.0, "degC"))
    assert conv(50.0, "%", "%RH") == (50.0, "%RH")
    assert conv(95.0, "%", "1") == pytest.approx((0.95, "1"))
    assert unit_conversion("furlong", "m/s") is None
    assert unit_conversion("%", "degC") is None


# -- the Cleaner --------------------------------------------------------------------------------

def test_range_and_not_finite_are_bad_and_other_readings_pass_unchanged() -> None:
    c = Cleaner([sensor()], SystemClock())
    out = run(c, [21.0, 150.0, math.nan, math.inf, -41.0, 21.1])
    assert [r.quality for r in out] == ["good", "bad", "bad", "bad", "bad", "good"]
    assert out[1].reasons == ("out_of_range",)
    assert out[2].reasons == ("not_finite",)
    assert out[3].reasons == ("not_finite",)
    good = reading(21.0, 99)
    assert c.process(good) is good  # unchanged readings are not copied
    counters = c.counters("env.temperature")
    assert counters["good"] == 3
    assert counters["bad"] == 4
    assert counters["reasons"] == {"out_of_range": 2, "not_finite": 2}


def test_rate_check_flags_a_jump_and_accepts_the_return() -> None:
    c = Cleaner([sensor()], SystemClock())
    out = run(c, [20.0, 20.1, 29.0, 20.2, 20.1])
    assert [r.quality for r in out] == ["good", "good", "suspect", "good", "good"]
    assert "rate" in out[2].reasons


def test_spike_in_a_slow_signal_is_flagged_and_counted() -> None:
    opts = CleanOptions(max_rate=100.0, hampel_window=7, hampel_k=4.0)
    c = Cleaner([sensor(temperature=opts)], SystemClock())
    values = [20.0 + 0.01 * (i % 3) for i in range(12)] + [24.0] + [20.01, 20.0]
    out = run(c, values)
    assert out[12].quality == "suspect"
    assert out[12].reasons == ("spike",)
    assert all(r.quality == "good" for i, r in enumerate(out) if i != 12)
    assert c.counters("env.temperature")["reasons"] == {"spike": 1}


def test_stuck_is_flagged_where_noise_is_expected_but_not_for_counters() -> None:
    c = Cleaner([sensor(temperature=CleanOptions(stuck_count=4))], SystemClock())
    out = run(c, [20.0, 20.1] + [20.2] * 5)
    assert [("stuck" in r.reasons) for r in out] == [False] * 5 + [True, True]
    counts = run(c, [0.0] * 10, quantity="vehicle_count", unit="count")
    assert all(r.quality == "good" for r in counts)  # idle loops report 0 again and again


def test_duplicates_are_dropped_per_channel_and_counted() -> None:
    c = Cleaner([sensor()], SystemClock())
    t = reading(20.0, 0)
    h = reading(50.0, 0, quantity="humidity", unit="%RH")  # same sensor and ts, other channel
    assert c.process(t) is t
    assert c.process(h) is h
    assert c.process(reading(20.0, 0)) is None
    assert c.counters("env.temperature")["dropped"] == {"duplicate": 1}
    assert c.counters("env.humidity")["dropped"] == {}


def test_units_are_normalised_and_unknown_units_are_bad() -> None:
    c = Cleaner([sensor()], SystemClock())
    p = c.process(reading(1013.25, 0, quantity="pressure", unit="hPa"))
    assert p is not None
    assert p.value == pytest.approx(101325.0)
    assert (p.unit, p.quality) == ("Pa", "good")
    bad = c.process(reading(20.0, 0, unit="V"))
    assert bad is not None
    assert (bad.quality, bad.reasons) == ("bad", ("unit",))
    # A quantity the table does not know keeps its unit, known spellings are still converted.
    ain = c.process(reading(1250.0, 0, quantity="ain0", unit="mV"))
    assert ain is not None
    assert ain.value == pytest.approx(1.25)
    assert ain.unit == "V"
    level = reading(3.2, 0, quantity="level", unit="m")
    assert c.process(level) is level


def test_driver_reasons_are_kept_and_quality_only_gets_worse() -> None:
    c = Cleaner([sensor()], SystemClock())
    r = Reading("env", "temperature", 200.0, "degC", T0, 0, "suspect", ("crc_retry",))
    out = c.process(r)
    assert out is not None
    assert out.quality == "bad"
    assert out.reasons == ("crc_retry", "out_of_range")


def test_stale_channels_are_reported_against_the_monotonic_time() -> None:
    c = Cleaner([sensor(period_s=2.0), sensor("radar", period_s=0.1)], SystemClock())
    c.process(Reading("env", "temperature", 20.0, "degC", T0, 100 * S))
    c.process(Reading("radar", "speed_in", 12.0, "m/s", T0, 100 * S))
    assert c.stale(105 * S) == []  # 5 s < 3 x 2 s
    assert c.stale(107 * S) == ["env.temperature"]  # the radar is an event channel
    assert c.counters("env.temperature", 107 * S)["stale"]
    c.process(Reading("env", "temperature", 20.0, "degC", T0 + S, 107 * S))
    assert c.stale(107 * S) == []


def test_history_is_forgotten_after_a_stale_gap() -> None:
    def cleaner_after_history() -> Cleaner:
        c = Cleaner([sensor()], SystemClock())
        run(c, [20.0 + 0.01 * (i % 2) for i in range(20)])
        return c

    # One second later, +5 degC is a spike (and too fast).
    soon = cleaner_after_history().process(
        Reading("env", "temperature", 25.0, "degC", T0 + 20 * S, 25 * S))
    assert soon is not None
    assert set(soon.reasons) == {"spike", "rate"}
    # After an hour of silence the old level says nothing: the same value is good.
    later = Reading("env", "temperature", 25.0, "degC", T0 + 3600 * S, 3605 * S)
    assert cleaner_after_history().process(later) is later


def test_skip_and_disabled_channels() -> None:
    c = Cleaner([sensor(temperature=CleanOptions(skip=["range"]),
                        humidity=CleanOptions(enabled=False))], SystemClock())
    hot = reading(120.0, 0)
    assert c.process(hot) is hot
    wild = run(c, [10.0, 300.0, 10.0], quantity="humidity", unit="%RH")
    assert all(r.quality == "good" for r in wild)
    nan = c.process(reading(math.nan, 5, quantity="humidity", unit="%RH"))
    assert nan is not None
    assert nan.reasons == ("not_finite",)


def test_overrides_are_validated_with_a_clear_message() -> None:
    with pytest.raises(ValidationError, match="min"):
        CleanOptions(min=10.0, max=5.0)
    with pytest.raises(ValidationError, match="extra"):
        CleanOptions.model_validate({"hampel_windw": 5})
    with pytest.raises(ValueError, match=r"sensor 'env', clean.temperature: the range 100.0..85.0"):
        Cleaner([sensor(temperature=CleanOptions(min=100.0))], SystemClock())


def test_resolve_merges_overrides_with_the_quantity_defaults() -> None:
    p = resolve("temperature", 2.0, CleanOptions(max=60.0, skip=["stuck"]))
    assert (p.min, p.max, p.stuck_count, p.stale_ns) == (-40.0, 60.0, None, 6 * S)
    g = resolve("ain0", None, None)
    assert (g.min, g.max, g.hampel_window, g.stale_ns) == (-math.inf, math.inf, None, None)


# -- robustness ---------------------------------------------------------------------------------

awkward = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(awkward, min_size=1, max_size=60),
       st.sampled_from(["temperature", "pressure", "ain0", "pm2_5", "active_power"]))
def test_filters_never_raise_on_nan_inf_or_huge_values(values: list[float], quantity: str) -> None:
    opts = CleanOptions(hampel_window=5, stuck_count=3, max_rate=1.0)
    c = Cleaner([sensor_with(quantity, opts)], SystemClock())
    unit = DEFAULTS[quantity].unit if quantity in DEFAULTS else "V"
    for i, v in enumerate(values):
        r = c.process(reading(v, i, quantity=quantity, unit=unit))
        assert r is not None
        if not math.isfinite(v):
            assert r.quality == "bad"
    h = Hampel(5, 3.0)
    s = Stuck(2)
    rl = RateLimit(1.0)
    for i, v in enumerate(values):
        h.is_spike(v)
        s.is_stuck(v)
        rl.too_fast(v, i)
        rl.accept(v, i)


def test_clean_options_come_from_the_sensor_config() -> None:
    cfg = SensorConfig.model_validate({
        "name": "env", "driver": "synthetic",
        "clean": {"temperature": {"max": 60, "skip": ["rate"], "noise": 0.05}}})
    c = Cleaner([cfg], SystemClock())
    out = run(c, [20.0, 59.0, 61.0])
    assert [r.reasons for r in out] == [(), (), ("out_of_range",)]  # no rate flag on the jump
    with pytest.raises(ValidationError, match="skip"):
        SensorConfig.model_validate({"name": "env", "driver": "synthetic",
                                     "clean": {"temperature": {"skip": ["ramp"]}}})
