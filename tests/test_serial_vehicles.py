"""Host-side vehicle detection on scripted report timelines, and the emulator's traffic model."""

from __future__ import annotations

import pytest

from drivers.emulated.ops243 import Pass, TrafficModel
from drivers.serial.vehicles import Vehicle, VehicleDetector

REPORT_S = 0.05  # a report every 50 ms, as the radar does at its default rate


def reports(start: float, duration: float, speed: float) -> list[tuple[float, float]]:
    n = round(duration / REPORT_S)
    return [(round(start + i * REPORT_S, 6), speed) for i in range(n + 1)]


def detect(
    timeline: list[tuple[float, float]], **kw: float
) -> tuple[list[Vehicle], VehicleDetector]:
    d = VehicleDetector(min_speed_mps=1.0, max_speed_mps=45.0, **kw)
    out: list[Vehicle] = []
    for t, v in sorted(timeline):
        out += d.feed(t, v)
    out += d.flush(timeline[-1][0] + 10)
    return out, d


def test_two_vehicles_in_opposite_directions_overlapping() -> None:
    inbound = [*reports(0.0, 1.2, 12.0), (0.6, 12.8)]  # peak mid-run
    outbound = reports(0.5, 1.0, -9.5)
    vehicles, _ = detect(inbound + outbound)
    assert [(v.direction, v.speed_mps) for v in vehicles] == [("in", 12.8), ("out", 9.5)]
    assert vehicles[0].start_s == 0.0 and vehicles[0].end_s == pytest.approx(1.2)
    assert vehicles[1].reports == 21


def test_two_vehicles_in_the_same_direction_need_a_gap() -> None:
    first = reports(0.0, 0.5, 10.0)
    second_close = reports(0.5 + 0.7, 0.5, 11.0)  # 0.7 s quiet: same target
    second_far = reports(0.5 + 0.8, 0.5, 11.0)  # 0.8 s quiet: a new vehicle
    assert len(detect(first + second_close)[0]) == 1
    vehicles, _ = detect(first + second_far)
    assert [v.speed_mps for v in vehicles] == [10.0, 11.0]


def test_short_runs_and_speeds_outside_the_window_are_not_vehicles() -> None:
    blip = reports(0.0, 0.05, 8.0)  # 50 ms: a bird
    walker = reports(2.0, 2.0, 0.8)  # under min speed
    glitch = [(5.0 + i * REPORT_S, 90.0) for i in range(10)]  # over max speed
    car = reports(8.0, 0.1, -15.0)  # exactly the minimum duration
    vehicles, d = detect(blip + walker + glitch + car)
    assert [(v.direction, v.speed_mps) for v in vehicles] == [("out", 15.0)]
    assert d.rejected == 1
    assert d.outside_window == len(walker) + len(glitch)


def test_a_run_ends_only_after_the_gap_and_deadline_says_when() -> None:
    d = VehicleDetector(gap_s=0.75)
    for t, speed in reports(0.0, 0.5, 7.0):
        assert d.feed(t, speed) == []
    assert d.next_deadline() == pytest.approx(1.25)
    assert d.flush(1.24) == []
    (vehicle,) = d.flush(1.25)
    assert vehicle.quantity == "speed_in" and d.next_deadline() is None


def test_finish_closes_open_runs() -> None:
    d = VehicleDetector()
    for t, v in reports(0.0, 0.3, -5.0) + reports(0.0, 0.3, 6.0):
        d.feed(t, v)
    assert [v.direction for v in d.finish()] == ["in", "out"]
    assert d.finish() == [] and d.next_deadline() is None


def test_invalid_windows_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        VehicleDetector(min_speed_mps=5, max_speed_mps=5)


def test_traffic_model_follows_the_day_and_is_reproducible() -> None:
    day = 1_750_032_000.0 - 1_750_032_000.0 % 86400
    m = TrafficModel(seed=4)
    assert m.flow_veh_h(day + 8 * 3600) > 5 * m.flow_veh_h(day + 3 * 3600)
    assert m.flow_veh_h(day + 17.5 * 3600) > m.flow_veh_h(day + 13 * 3600)
    a = TrafficModel(seed=4).arrivals(day + 7 * 3600, day + 9 * 3600)
    b = TrafficModel(seed=4).arrivals(day + 7 * 3600, day + 9 * 3600)
    assert a == b and len(a) > 500
    night = TrafficModel(seed=4).arrivals(day + 2 * 3600, day + 4 * 3600)
    assert len(night) < len(a) / 5
    congested = [t for t, _ in a if m.congested(t)]
    free = [p for t, p in a if not m.congested(t)]
    if congested:
        assert all(p.speed_mps <= 6.0 for t, p in a if m.congested(t))
    assert all(6.0 <= p.speed_mps <= 25.0 for p in free)
    # Some peak-hour blocks are congested over a week, far fewer night blocks.
    week = [day + k * 86400 for k in range(7)]
    peak_blocks = sum(m.congested(d0 + 8 * 3600 + i * 900) for d0 in week for i in range(6))
    night_blocks = sum(m.congested(d0 + 2 * 3600 + i * 900) for d0 in week for i in range(6))
    assert peak_blocks > night_blocks


def test_emulated_pass_follows_the_doppler_cosine() -> None:
    import random

    p = Pass(1, 14.0, 2.0, cosine=True)
    rng = random.Random(0)
    speeds = [p.speed_at(t / 10, rng) for t in range(21)]
    assert speeds[0] == pytest.approx(14.0, rel=0.01)
    assert speeds == sorted(speeds, reverse=True)  # closing in: the cosine shrinks
    out = Pass(-1, 14.0, 2.0, cosine=True)
    assert out.speed_at(2.0, rng) == pytest.approx(-14.0, rel=0.01)
