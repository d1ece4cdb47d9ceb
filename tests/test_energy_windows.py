"""Per-window energy of power channels, windows closed as readings flow in (as in the agent),
against the exact integral of the signal (numpy polynomial integration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.config.load import load_config
from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.clean import Cleaner
from agent.pipeline.windows import GAP_PERIODS, Windower
from agent.readings import Reading, Window
from drivers.emulated.pzem004t import EV_POWER_W, EmulatedMeter

ROOT = Path(__file__).resolve().parents[1]

S = 10**9
T0 = 1_800_000_000 * S
GRACE_NS = 200_000_000  # the agent's window grace
DELAY_NS = 30_000_000  # a reading reaches the windower this long after it was stamped
TICK_NS = 100_000_000  # close_due runs at least this often


def run(period_s: float, window_s: float, phase_s: float, power: np.polynomial.Polynomial,
        duration_s: float) -> list[tuple[Window, int]]:
    """Samples of ``power`` (W, t in s) every ``period_s`` from ``phase_s``; every window with
    the wall time at which it was published."""
    w = Windower([StreamConfig(name="energy", sensors=["meter"], window_s=window_s)],
                 [SensorConfig(name="meter", driver="pzem004t", period_s=period_s,
                               port="emulated")])
    period_ns = round(period_s * S)
    events: list[tuple[int, int]] = []  # (arrival, sample time) ; sample time -1: a tick
    t = round(phase_s * S)
    while t < duration_s * S:
        events.append((t + DELAY_NS, t))
        t += period_ns
    events += [(k, -1) for k in range(0, round((duration_s + 10) * S), TICK_NS)]
    events.sort()
    out: list[tuple[Window, int]] = []
    for arrival, t_ns in events:
        if t_ns >= 0:
            ts = T0 + t_ns
            w.add(Reading("meter", "active_power", float(power(t_ns / S)), "W", ts, t_ns))
        now = T0 + arrival
        out += [(x, now) for x in w.close_due(now, GRACE_NS)]
    return out


def full_windows(out: list[tuple[Window, int]], phase_s: float, period_s: float,
                 duration_s: float) -> list[tuple[Window, int]]:
    last_s = phase_s + period_s * int((duration_s - phase_s) / period_s - 1e-9)
    return [(x, now) for x, now in out
            if (x.start_ns - T0) / S >= phase_s and (x.end_ns - T0) / S <= last_s]


def exact_wh(power: np.polynomial.Polynomial, x: Window) -> float:
    integral = power.integ()
    a, b = (x.start_ns - T0) / S, (x.end_ns - T0) / S
    return float(integral(b) - integral(a)) / 3600.0


CASES = [(p, wl, f) for p in (0.3, 1.0, 2.0, 3.0) for wl in (5.0, 10.0)
         for f in (0.0, 0.13, 0.5, 0.91)]


@pytest.mark.parametrize(("period_s", "window_s", "phase_frac"), CASES)
def test_constant_power_gives_each_window_power_times_length(
        period_s: float, window_s: float, phase_frac: float) -> None:
    phase = phase_frac * period_s
    power = np.polynomial.Polynomial([3700.0])
    out = run(period_s, window_s, phase, power, 12 * window_s)
    full = full_windows(out, phase, period_s, 12 * window_s)
    assert len(full) >= 9
    for x, published in full:
        assert x.derived["energy_wh"] == pytest.approx(3700.0 * window_s / 3600, rel=1e-3)
        assert x.derived["power_mean_w"] == pytest.approx(3700.0, rel=1e-3)
        assert "partial" not in x.flags
        # Held for the next sample at most as long as the gap limit allows.
        assert published <= x.end_ns + round(GAP_PERIODS * period_s * S) + GRACE_NS + TICK_NS


@pytest.mark.parametrize(("period_s", "window_s", "phase_frac"), CASES)
def test_a_ramp_matches_the_exact_integral_in_every_window(
        period_s: float, window_s: float, phase_frac: float) -> None:
    phase = phase_frac * period_s
    duration = 12 * window_s
    power = np.polynomial.Polynomial([500.0, 7000.0 / duration])  # 0.5 -> 7.5 kW
    out = run(period_s, window_s, phase, power, duration)
    full = full_windows(out, phase, period_s, duration)
    assert len(full) >= 9
    for x, _ in full:
        exact = exact_wh(power, x)
        assert x.derived["energy_wh"] == pytest.approx(exact, rel=5e-3)
        assert x.derived["power_mean_w"] == pytest.approx(exact * 3600 / window_s, rel=5e-3)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([0.3, 1.0, 2.0, 3.0]), st.sampled_from([5.0, 10.0]),
       st.floats(0.0, 0.999))
def test_any_phase_gives_each_window_its_exact_energy(period_s: float, window_s: float,
                                                      phase_frac: float) -> None:
    phase = phase_frac * period_s
    power = np.polynomial.Polynomial([800.0, 25.0])
    out = run(period_s, window_s, phase, power, 6 * window_s)
    full = full_windows(out, phase, period_s, 6 * window_s)
    assert len(full) >= 4
    for x, _ in full:
        assert x.derived["energy_wh"] == pytest.approx(exact_wh(power, x), rel=1e-9)


def test_nothing_is_counted_twice_and_windows_close_in_order() -> None:
    power = np.polynomial.Polynomial([1000.0, 20.0])
    out = run(3.0, 5.0, 0.4, power, 60.0)
    starts = [x.start_ns for x, _ in out]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    total = sum(x.derived["energy_wh"] for x, _ in out)
    first, last = 0.4, 0.4 + 3.0 * 19  # the samples span this
    integral = power.integ()
    assert total == pytest.approx(float(integral(last) - integral(first)) / 3600, rel=1e-9)


def test_a_window_shorter_than_the_period_gets_its_part_too() -> None:
    power = np.polynomial.Polynomial([2000.0])
    out = run(3.0, 1.0, 0.5, power, 30.0)
    full = full_windows(out, 0.5, 3.0, 30.0)
    assert len(full) >= 20
    for x, _ in full:
        assert x.derived["energy_wh"] == pytest.approx(2000.0 / 3600, rel=1e-3)


def test_the_demo_charger_shows_a_steady_energy_per_window() -> None:
    """The demo's charger meter (its emulator's load at the demo's period) through the demo's
    cleaner and energy stream, closing windows as readings arrive: while it charges at full
    power, every window shows the same energy."""
    cfg = load_config(ROOT / "agent" / "examples" / "demo.toml", env={})
    charger = next(s for s in cfg.sensors if s.name == "charger")
    stream = next(st for st in cfg.streams if "charger" in st.sensors)
    emu = charger.options["emulator"]
    meter = EmulatedMeter(charger.address or 1, emu["profile"], lambda: 0.0,
                          int(emu.get("seed", 0)))
    period_ns = round(charger.period_s * S)
    # The first minute of full power in the emulator's sessions.
    t_ns = 0
    while not all(meter.load((t_ns + k * period_ns) / S)[0] == EV_POWER_W for k in range(40)):
        t_ns += 60 * S
    cleaner = Cleaner(cfg.sensors, SystemClock())
    windower = Windower([stream], cfg.sensors)
    out: list[Window] = []
    for k in range(40):
        t = t_ns + k * period_ns
        r = cleaner.process(Reading("charger", "active_power", meter.load(t / S)[0], "W",
                                    T0 + t, t))
        assert r is not None and r.quality == "good"
        windower.add(r)
        # The agent closes due windows on every batch, between samples too.
        for tick in range(DELAY_NS, period_ns + DELAY_NS, TICK_NS):
            out += windower.close_due(T0 + t + tick, GRACE_NS)
    full = [x for x in out if x.start_ns >= T0 + t_ns
            and x.end_ns <= T0 + t_ns + 39 * period_ns]
    assert len(full) >= 10
    energies = {round(x.derived["energy_wh"], 6) for x in full}
    assert energies == {round(EV_POWER_W * stream.window_s / 3600, 6)}
