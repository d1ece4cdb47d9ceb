"""What the emulated MCU measures, and the clock mapping, checked against plain arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from firmware_bridge.signals import LoopDetector, PulseCounter, weekday_profile
from firmware_bridge.timesync import ClockMap

EIGHT_AM = datetime(2026, 3, 10, 8, 0, tzinfo=UTC).timestamp()
THREE_AM = datetime(2026, 3, 10, 3, 0, tzinfo=UTC).timestamp()


def test_profile_has_peaks_and_quiet_nights() -> None:
    assert weekday_profile(EIGHT_AM) == pytest.approx(1.0)
    assert weekday_profile(THREE_AM) < 0.1
    assert all(0 < weekday_profile(EIGHT_AM + h * 3600) <= 1 for h in range(24))


def test_loop_detector_over_an_hour_of_morning_peak() -> None:
    loop = LoopDetector(EIGHT_AM, peak_veh_h=900, seed=4)
    counts, occupied_us = 0, 0
    for second in range(1, 3601):
        iv = loop.advance(EIGHT_AM + second)
        assert 0 <= iv.occupancy_us <= 1_000_000
        counts += iv.count
        occupied_us += iv.occupancy_us
        assert iv.total == counts
    # The profile stays near 1 for the hour: about 900 vehicles, each over the loop ~0.5 s.
    assert 750 < counts < 1000
    occupancy = occupied_us / 3.6e9
    assert 0.05 < occupancy < 0.25
    assert loop.advance(EIGHT_AM + 3600).count == 0  # no time, no vehicles


def test_loop_detector_is_quiet_at_night() -> None:
    loop = LoopDetector(THREE_AM, peak_veh_h=900, seed=4)
    night = sum(loop.advance(THREE_AM + s).count for s in range(1, 3601))
    assert night < 100


def test_pulse_counter_matches_the_energy_it_draws() -> None:
    meter = PulseCounter(EIGHT_AM, pulses_per_kwh=1000, base_w=500, peak_w=0, seed=2)
    energy_wh = 0.0
    for second in range(1, 3601):
        t0 = EIGHT_AM + second - 1
        iv = meter.advance(t0 + 1)
        energy_wh += meter.power_w(t0 + 0.5) / 3600
        assert iv.total == meter.total
    # 1000 pulses per kWh: one pulse per Wh, never more than one pulse behind.
    assert meter.total == pytest.approx(energy_wh, abs=1.0)
    assert 400 < meter.total < 600


def test_clock_map_before_and_after_a_reboot() -> None:
    clock = ClockMap()
    assert clock.to_host_ns(5) is None
    clock.add(1_000_000, 1_000_200, 10)  # device 10 us <-> host midpoint 1_000_100 ns
    assert clock.to_host_ns(10) == 1_000_100
    assert clock.offset_ns == 1_000_100 - 10_000
    clock.add(2_000_000, 2_000_200, 3)  # the device clock went backwards: it rebooted
    assert clock.samples == 1
    assert clock.to_host_ns(3) == 2_000_100


def test_clock_map_prefers_tight_round_trips() -> None:
    clock = ClockMap(min_span_s=1000)  # offset only
    clock.add(0, 10_000_000, 0)  # 10 ms round trip, midpoint 5 ms
    clock.add(20_000_000, 22_000_000, 15_000)  # 2 ms round trip says offset 6 ms
    assert clock.to_host_ns(0) == 6_000_000
    assert clock.best_rtt_ns == 2_000_000
