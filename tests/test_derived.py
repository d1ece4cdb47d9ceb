"""Derived window values (CHANNELS.md): traffic and energy."""

from __future__ import annotations

import math

import pytest

from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.derived import ENERGY_NAMES, TRAFFIC_NAMES
from agent.pipeline.windows import Windower
from agent.readings import Reading, Window

S = 10**9
T0 = 1_800_000_000 * S


def windower(*sensors: tuple[str, str, float], window_s: float = 10.0) -> Windower:
    cfgs = [SensorConfig(name=n, driver=d, period_s=p, port="emulated") for n, d, p in sensors]
    return Windower([StreamConfig(name="s", sensors=[n for n, _, _ in sensors],
                                  window_s=window_s)], cfgs)


def add(w: Windower, sensor: str, quantity: str, value: float, t_s: float, unit: str,
        quality: str = "good") -> None:
    ts = T0 + round(t_s * S)
    reasons = () if quality == "good" else ("spike",)
    w.add(Reading(sensor, quantity, value, unit, ts, ts - T0, quality, reasons))  # type: ignore[arg-type]


def by_start(out: list[Window]) -> dict[float, Window]:
    return {(x.start_ns - T0) / S: x for x in out}


def test_radar_events_give_vehicles_flow_and_speeds() -> None:
    w = windower(("radar", "ops243", 0.1))
    for t, q, v in ((1, "speed_in", 10.0), (2, "speed_in", 14.0), (3, "speed_out", 12.0),
                    (4, "speed_in", 95.0)):  # the last one flagged, not a vehicle
        add(w, "radar", q, v, t, "m/s", "good" if v < 90 else "suspect")
    (win,) = w.flush()
    d = win.derived
    assert set(d) == set(TRAFFIC_NAMES)
    assert d["vehicles"] == 3.0
    assert d["flow_veh_h"] == pytest.approx(3 * 3600 / 10)
    assert d["speed_in_mean"] == pytest.approx(12.0)
    assert d["speed_out_mean"] == pytest.approx(12.0)
    assert d["speed_mean"] == pytest.approx(12.0)
    assert math.isnan(d["occupancy"])


def test_a_quiet_radar_means_zero_vehicles_not_no_data() -> None:
    w = windower(("radar", "ops243", 0.1), ("env", "synthetic", 1.0))
    add(w, "env", "temperature", 20.0, 1, "degC")
    (win,) = w.flush()
    assert win.derived["vehicles"] == 0.0
    assert win.derived["flow_veh_h"] == 0.0
    assert math.isnan(win.derived["speed_mean"])


def test_loop_detector_counts_and_occupancy() -> None:
    w = windower(("loop1", "synthetic", 5.0), ("loop2", "synthetic", 5.0))
    for t in (0, 5):
        add(w, "loop1", "vehicle_count", 3.0, t, "count")
        add(w, "loop1", "occupancy", 0.2, t, "1")
        add(w, "loop2", "vehicle_count", 1.0, t, "count")
        add(w, "loop2", "occupancy", 0.4, t, "1")
    (win,) = w.flush()
    assert win.derived["vehicles"] == 8.0
    assert win.derived["flow_veh_h"] == pytest.approx(8 * 360)
    assert win.derived["occupancy"] == pytest.approx(0.3)


def test_energy_is_the_trapezoidal_integral_and_power_the_time_weighted_mean() -> None:
    w = windower(("meter", "pzem004t", 1.0))
    # 0..4 s ramp 100 -> 500 W, then 500 W to 9 s.
    for t in range(10):
        add(w, "meter", "active_power", min(100.0 + 100.0 * t, 500.0), t, "W")
    (win,) = w.flush()
    assert set(win.derived) == set(ENERGY_NAMES)
    ws = 4 * 300.0 + 5 * 500.0  # W s: ramp area + flat area
    assert win.derived["energy_wh"] == pytest.approx(ws / 3600)
    assert win.derived["power_mean_w"] == pytest.approx(ws / 9)


def test_gaps_longer_than_three_periods_are_not_bridged() -> None:
    w = windower(("meter", "pzem004t", 1.0))
    for t in (0, 1, 2, 7, 8):  # 2 -> 7 is a 5 s gap
        add(w, "meter", "active_power", 360.0, t, "W")
    (win,) = w.flush()
    assert win.derived["energy_wh"] == pytest.approx(360.0 * 3 / 3600)
    assert win.derived["power_mean_w"] == pytest.approx(360.0)


def test_flagged_power_readings_are_bridged_over() -> None:
    w = windower(("meter", "pzem004t", 1.0))
    for t, v in ((0, 360.0), (1, 9000.0), (2, 360.0)):
        add(w, "meter", "active_power", v, t, "W", "good" if v < 1000 else "suspect")
    (win,) = w.flush()
    assert win.derived["energy_wh"] == pytest.approx(360.0 * 2 / 3600)


def test_energy_across_a_window_boundary_is_split_and_none_is_lost() -> None:
    w = windower(("meter", "pzem004t", 2.0), ("ina", "ina219", 2.0), window_s=5.0)
    for t in range(0, 20, 2):
        add(w, "meter", "active_power", 100.0 + 10 * t, t, "W")
        add(w, "ina", "power", 7.2, t + 1, "W")
    out = w.close_due(T0 + 30 * S, 0)
    wins = by_start(out)
    assert sorted(wins) == [0.0, 5.0, 10.0, 15.0]
    # meter: P(t) = 100 + 10 t on 0..18 s; the window 5..10 s gets exactly its part.
    assert wins[5.0].derived["energy_wh"] == pytest.approx(
        (5 * (150 + 200) / 2 + 5 * 7.2) / 3600)
    total = sum(x.derived["energy_wh"] for x in out)
    meter_ws = 18 * (100 + 280) / 2
    ina_ws = 7.2 * 18
    assert total == pytest.approx((meter_ws + ina_ws) / 3600)
    assert wins[5.0].derived["power_mean_w"] == pytest.approx(175.0 + 7.2)


def test_a_stream_without_power_or_traffic_has_no_derived_values() -> None:
    w = windower(("env", "synthetic", 1.0))
    add(w, "env", "temperature", 20.0, 0, "degC")
    (win,) = w.flush()
    assert win.derived == {}


def test_power_with_no_input_is_nan() -> None:
    w = windower(("meter", "pzem004t", 1.0), ("env", "synthetic", 1.0))
    add(w, "env", "temperature", 20.0, 0, "degC")
    (win,) = w.flush()
    assert math.isnan(win.derived["energy_wh"])
    assert math.isnan(win.derived["power_mean_w"])
