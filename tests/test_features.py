"""Feature rows from stream windows: roll-up, history, missing values, time features."""

from __future__ import annotations

import math
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from agent.features import (
    FeatureBuilder,
    FeatureError,
    FeatureSpec,
    InputSpec,
    parse_input,
    time_features,
)
from agent.readings import ChannelStats, Window

NS = 1_000_000_000
T0 = 1_740_985_200  # 2025-03-03 07:00 UTC, a Monday (08:00 in Berlin), aligned to 300 s


def stats(mean: float, count: int = 1, unit: str = "1") -> ChannelStats:
    return ChannelStats(count, mean, mean, mean, mean, 0.0, unit)


def spec(*names: str, hold: float = 900.0, tz: str = "UTC") -> FeatureSpec:
    fills = {n: -1.0 for n in names}
    return FeatureSpec(tuple(InputSpec(n, fills[n]) for n in names), 300, tz,
                       {q: hold for q in ("speed_mean", "flow_veh_h", "power_mean_w",
                                          "occupancy", "temperature", "humidity",
                                          "speed_in_mean", "speed_out_mean")})


def traffic_window(start_s: int, dur_s: int, n_in: int, v_in: float, n_out: int, v_out: float,
                   occ: float) -> Window:
    ch = {"loop.occupancy": stats(occ)}
    if n_in:
        ch["radar.speed_in"] = stats(v_in, n_in, "m/s")
    if n_out:
        ch["radar.speed_out"] = stats(v_out, n_out, "m/s")
    return Window("traffic", start_s * NS, (start_s + dur_s) * NS, ch)


def test_time_features_in_local_time() -> None:
    f = time_features(T0 + 300, ZoneInfo("Europe/Berlin"))  # 08:05 local, Monday
    hour = 8 + 5 / 60
    assert f["hour_sin"] == pytest.approx(math.sin(2 * math.pi * hour / 24))
    assert f["hour_cos"] == pytest.approx(math.cos(2 * math.pi * hour / 24))
    assert (f["dow_sin"], f["dow_cos"]) == pytest.approx((0.0, 1.0))
    utc = time_features(T0 + 300, ZoneInfo("UTC"))
    assert utc["hour_sin"] != pytest.approx(f["hour_sin"])


def test_short_windows_roll_up_into_the_model_window() -> None:
    rng = np.random.default_rng(1)
    b = FeatureBuilder(spec("flow_veh_h", "speed_in_mean", "speed_out_mean", "speed_mean",
                            "occupancy"))
    subs = []
    for k in range(30):  # 30 windows of 10 s
        subs.append(traffic_window(T0 + 10 * k, 10, int(rng.integers(0, 4)),
                                   float(rng.uniform(8, 15)), int(rng.integers(0, 3)),
                                   float(rng.uniform(8, 15)), float(rng.uniform(0, 0.3))))
    rows = [b.push(w) for w in subs]
    assert all(r is None for r in rows[:-1])
    row = rows[-1]
    assert row is not None and row.start_ns == T0 * NS and row.end_ns == (T0 + 300) * NS
    n_in = sum(w.channels["radar.speed_in"].count for w in subs if "radar.speed_in" in w.channels)
    n_out = sum(w.channels["radar.speed_out"].count for w in subs
                if "radar.speed_out" in w.channels)
    s_in = sum(w.channels["radar.speed_in"].mean * w.channels["radar.speed_in"].count
               for w in subs if "radar.speed_in" in w.channels)
    s_out = sum(w.channels["radar.speed_out"].mean * w.channels["radar.speed_out"].count
                for w in subs if "radar.speed_out" in w.channels)
    occ = np.mean([w.channels["loop.occupancy"].mean for w in subs])
    want = [(n_in + n_out) * 12, s_in / n_in, s_out / n_out, (s_in + s_out) / (n_in + n_out), occ]
    assert row.values.tolist() == pytest.approx(want, rel=1e-5)
    assert row.missing == ()


def test_derived_values_are_used_without_channels() -> None:
    b = FeatureBuilder(spec("flow_veh_h", "speed_mean", "power_mean_w"))
    w = Window("s", T0 * NS, (T0 + 300) * NS, {},
               derived={"vehicles": 10.0, "speed_mean": 11.0, "power_mean_w": 250.0})
    row = b.push(w)
    assert row is not None
    assert row.values.tolist() == pytest.approx([120.0, 11.0, 250.0])


def test_hold_then_fill_then_lags() -> None:
    b = FeatureBuilder(spec("speed_mean", "speed_mean_lag1", "speed_mean_lag2", hold=600))
    values = [10.0, 11.0, math.nan, math.nan, math.nan, 12.0]
    rows = [b.push_values((T0 + 300 * i) * NS, {"speed_mean": v}) for i, v in enumerate(values)]
    # Window 2 and 3 hold 11.0 (300 s and 600 s old); window 4 is 900 s old: missing -> fill.
    assert [r.values[0] for r in rows] == pytest.approx([10, 11, 11, 11, -1, 12])
    assert rows[4].missing == ("speed_mean",)
    assert rows[5].values.tolist() == pytest.approx([12, -1, 11])
    assert rows[0].values.tolist() == pytest.approx([10, -1, -1])  # no history yet


def test_gap_in_windows_counts_as_missing_history() -> None:
    b = FeatureBuilder(spec("power_mean_w", "power_mean_w_lag1", "power_mean_w_lag3", hold=0))
    b.push_values(T0 * NS, {"power_mean_w": 100.0})
    b.push_values((T0 + 300) * NS, {"power_mean_w": 200.0})
    row = b.push_values((T0 + 900) * NS, {"power_mean_w": 400.0})  # window at +600 s missing
    assert row.values.tolist() == pytest.approx([400.0, -1.0, 100.0])


def test_history_is_bounded() -> None:
    b = FeatureBuilder(spec("power_mean_w", "power_mean_w_lag5"))
    for i in range(500):
        row = b.push_values((T0 + 300 * i) * NS, {"power_mean_w": float(i)})
    assert row.values.tolist() == [499.0, 494.0]
    assert max(len(h) for h in b._history.values()) == 6


def test_weather_comes_from_any_stream_and_goes_stale() -> None:
    b = FeatureBuilder(spec("temperature", "humidity", hold=600))
    env = Window("environment", T0 * NS, (T0 + 60) * NS,
                 {"a.temperature": stats(4.0, unit="degC"),
                  "b.temperature": stats(6.0, unit="degC"),
                  "a.humidity": stats(80.0, unit="%RH")})
    b.observe(env)
    row = b.push(Window("energy", T0 * NS, (T0 + 300) * NS, {"m.active_power": stats(5.0)}))
    assert row is not None and row.values.tolist() == [5.0, 80.0]
    late = b.push(Window("energy", (T0 + 900) * NS, (T0 + 1200) * NS, {}))
    assert late is not None and late.values.tolist() == [-1.0, -1.0]
    assert late.missing == ("temperature", "humidity")


def test_window_longer_than_the_model_window_is_an_error() -> None:
    b = FeatureBuilder(spec("speed_mean"))
    with pytest.raises(FeatureError, match=r"windows are 600 s, longer than the model's 300 s"):
        b.push(Window("traffic", T0 * NS, (T0 + 600) * NS, {}))


def test_late_window_is_dropped() -> None:
    b = FeatureBuilder(spec("power_mean_w"))
    assert b.push(Window("e", (T0 + 300) * NS, (T0 + 600) * NS, {"m.power": stats(1.0)}))
    assert b.push(Window("e", T0 * NS, (T0 + 300) * NS, {"m.power": stats(2.0)})) is None
    assert b.dropped_late == 1


def test_input_names_are_parsed_strictly() -> None:
    assert parse_input("speed_mean_lag12") == ("speed_mean", 12)
    assert parse_input("hour_cos") == ("hour_cos", 0)
    for bad in ("speed", "speed_mean_lag0", "rain_lag1", "hour_sin_lag1"):
        with pytest.raises(FeatureError, match="unknown model input"):
            parse_input(bad)
