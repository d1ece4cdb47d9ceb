"""Feature rows from stream windows: roll-up, history, missing values, time features."""

from __future__ import annotations

import logging
import math
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from agent.pipeline import features
from agent.pipeline.features import (
    FeatureBuilder,
    FeatureError,
    FeatureSpec,
    InputSpec,
    parse_input,
    rollup,
)
from agent.pipeline.localtime import LocalTime, time_features
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


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu",
                                  "America/St_Johns", "UTC"])
def test_the_remembered_offsets_give_the_definition_across_offset_changes(zone: str) -> None:
    """A year and a half in steps of 7 s to 2 h, in zones with half-hour and 45-minute offsets and a
    half-hour daylight-saving change (Lord Howe): the same numbers as the definition."""
    tz = ZoneInfo(zone)
    clock, rng = LocalTime(tz), np.random.default_rng(4)
    t = float(T0)
    for step in rng.choice([7, 10, 60, 300, 900, 7200], 40_000):
        t += float(step)
        assert clock.features(t) == time_features(t, tz), t


def test_short_windows_roll_up_into_the_model_window() -> None:
    rng = np.random.default_rng(1)
    b = FeatureBuilder(spec("flow_veh_h", "speed_in_mean", "speed_out_mean", "speed_mean",
                            "occupancy"))
    subs = []
    for k in range(30):  # 30 windows of 10 s
        subs.append(traffic_window(T0 + 10 * k, 10, int(rng.integers(1, 4)),
                                   float(rng.uniform(8, 15)), int(rng.integers(1, 3)),
                                   float(rng.uniform(8, 15)), float(rng.uniform(0, 0.3))))
    rows = [b.push(w) for w in subs]
    for k, row in enumerate(rows):  # one row per window, on what the model window holds so far
        assert row is not None and row.end_ns == subs[k].end_ns
        assert row.start_ns == row.end_ns - 300 * NS and row.covered_s == 10 * (k + 1)
        seen = subs[: k + 1]
        n_in = sum(w.channels["radar.speed_in"].count for w in seen)
        n_out = sum(w.channels["radar.speed_out"].count for w in seen)
        s_in = sum(w.channels["radar.speed_in"].mean * w.channels["radar.speed_in"].count
                   for w in seen)
        s_out = sum(w.channels["radar.speed_out"].mean * w.channels["radar.speed_out"].count
                    for w in seen)
        occ = np.mean([w.channels["loop.occupancy"].mean for w in seen])
        want = [(n_in + n_out) * 3600 / (10 * (k + 1)), s_in / n_in, s_out / n_out,
                (s_in + s_out) / (n_in + n_out), occ]
        assert row.values.tolist() == pytest.approx(want, rel=1e-5)
        assert row.missing == ()
    assert rows[-1].start_ns == T0 * NS and rows[-1].end_ns == (T0 + 300) * NS


def test_sliding_window_drops_what_left_it() -> None:
    b = FeatureBuilder(spec("power_mean_w"))
    rows = [b.push(Window("e", (T0 + 60 * k) * NS, (T0 + 60 * (k + 1)) * NS,
                          {"m.active_power": stats(100.0 * (k + 1))})) for k in range(8)]
    # Window k ends at T0 + 60 (k + 1); the model window holds windows k-4 .. k.
    assert [r.values[0] for r in rows if r] == pytest.approx(
        [100, 150, 200, 250, 300, 400, 500, 600])


def test_lags_come_from_the_model_windows_ending_n_windows_back() -> None:
    b = FeatureBuilder(spec("power_mean_w", "power_mean_w_lag1", "power_mean_w_lag2", hold=0))
    power = [100.0 * (k + 1) for k in range(13)]  # 60 s windows: 100, 200, ..., 1300 W
    rows = {}
    for k, p in enumerate(power):
        if k == 4:
            continue  # a window never came
        row = b.push(Window("e", (T0 + 60 * k) * NS, (T0 + 60 * (k + 1)) * NS,
                            {"m.active_power": stats(p)}))
        assert row is not None
        rows[k] = row
    # First window: only the current model window has anything; no history yet.
    assert rows[0].values.tolist() == [100.0, -1.0, -1.0]
    assert rows[0].missing == ("power_mean_w_lag1", "power_mean_w_lag2")
    # Window 12 ends at E = T0 + 780 s (not on a 300 s boundary):
    #   now   (E - 300, E]        windows 8..12    -> mean(900..1300)          = 1100
    #   lag1  (E - 600, E - 300]  windows 3..7 but 4 never came -> mean(400, 600, 700, 800) = 625
    #   lag2  (E - 900, E - 600]  windows 0..2, the start of the stream -> mean(100..300) = 200
    assert rows[12].end_ns == (T0 + 780) * NS
    assert rows[12].values.tolist() == pytest.approx([1100.0, 625.0, 200.0])
    assert rows[12].missing == ()
    # Window 5 ends at T0 + 360: now is windows 1..5 without 4 (200, 300, 400, 600), lag1 is
    # (T0 - 240, T0 + 60] = window 0, lag2 lies before the start.
    assert rows[5].values.tolist() == pytest.approx([375.0, 100.0, -1.0])
    # Window 3 ends at T0 + 240: lag1 would be (T0 - 360, T0 - 60], before the stream began.
    assert rows[3].values.tolist() == pytest.approx([250.0, -1.0, -1.0])


def test_sliding_rows_equal_the_aligned_rollup_at_aligned_ends() -> None:
    """Training builds rows from whole aligned 300 s windows; a gateway slides over 10 s ones.
    Wherever a 10 s window ends on a 300 s boundary the two rows are the same, bit for bit."""
    names = ("flow_veh_h", "flow_veh_h_lag1", "flow_veh_h_lag3", "speed_mean",
             "speed_mean_lag2", "speed_in_mean", "speed_out_mean", "occupancy",
             "occupancy_lag1", "hour_sin", "dow_cos", "temperature", "humidity",
             "temperature_lag1")
    rng = np.random.default_rng(7)
    windows = []
    for k in range(6 * 30 * 3):  # 90 minutes of 10 s windows, with gaps and quiet spells
        if k in (41, 89) or 300 <= k < 330 or 400 <= k < 470:
            continue  # lost windows, a whole model window lost, a 700 s outage
        quiet = 150 <= k < 210
        w = traffic_window(T0 + 10 * k, 10, 0 if quiet else int(rng.integers(0, 4)),
                           float(rng.uniform(8, 15)), 0 if quiet else int(rng.integers(0, 3)),
                           float(rng.uniform(8, 15)), float(rng.uniform(0, 0.3)))
        ch = dict(w.channels)
        if k % 7:
            ch["env.temperature"] = stats(float(rng.uniform(-5, 20)), unit="degC")
            ch["env.humidity"] = stats(float(rng.uniform(40, 90)), unit="%RH")
        if 500 <= k < 520:
            del ch["loop.occupancy"]
        windows.append(Window(w.stream, w.start_ns, w.end_ns, ch))
    s = spec(*names, hold=600, tz="Europe/Berlin")
    sliding = FeatureBuilder(s)
    slid = {}
    for w in windows:
        row = sliding.push(w)
        assert row is not None
        slid[row.end_ns] = row
    assert len(slid) == len(windows)  # one row per stream window
    aligned = FeatureBuilder(s)
    buckets: dict[int, list[Window]] = {}
    for w in windows:
        buckets.setdefault(w.start_ns - w.start_ns % (300 * NS), []).append(w)
    compared = 0
    for start, members in sorted(buckets.items()):
        for w in members:
            aligned.observe(w)
        row = aligned.push_values(start, rollup(members))
        if row.end_ns in slid:
            other = slid[row.end_ns]
            assert np.array_equal(row.values, other.values), row.end_ns
            assert row.missing == other.missing
            compared += 1
    assert compared == len(buckets) - 2  # buckets whose last window was lost have no twin
    assert any(r.missing for r in slid.values()) and any(not r.missing for r in slid.values())


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
    b = FeatureBuilder(spec("power_mean_w", "power_mean_w_lag5", hold=600))
    for i in range(500):
        row = b.push_values((T0 + 300 * i) * NS, {"power_mean_w": float(i)})
    assert row.values.tolist() == [499.0, 494.0]
    # (largest lag + hold + 1) model windows: lag5, held up to two windows further back.
    assert b.history_windows == 8
    t = b.push(Window("e", (T0 + 150_000) * NS, (T0 + 150_010) * NS, {"m.power": stats(1.0)}))
    for k in range(1, 2000):  # 10 s windows: 30 per model window
        t = b.push(Window("e", (T0 + 150_000 + 10 * k) * NS, (T0 + 150_010 + 10 * k) * NS,
                          {"m.power": stats(float(k))}))
    assert b.history_windows == 8 * 30
    assert t is not None and t.values.tolist() == [1984.5, 1834.5]


def test_history_cap_forgets_the_oldest_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(features, "MAX_HISTORY_WINDOWS", 100)
    b = FeatureBuilder(spec("power_mean_w", "power_mean_w_lag1", hold=0))
    with caplog.at_level(logging.WARNING, logger="agent.pipeline.features"):
        for k in range(200):  # 1 s windows: lag1 needs 600 of them, the cap keeps 100
            row = b.push(Window("e", (T0 + k) * NS, (T0 + k + 1) * NS, {"m.power": stats(5.0)}))
    assert b.history_windows == 100
    assert row is not None and row.values.tolist() == [5.0, -1.0]
    assert "capped at 100 stream windows" in caplog.text


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
    with pytest.raises(FeatureError, match=r"window \[\d+, \d+\) ns does not end after it starts"):
        b.push(Window("traffic", T0 * NS, T0 * NS, {}))


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
