"""Drift and freeze of redundant sensors, across windows: generated windows driven straight
through the fusion code (DriftMonitor + fuse, as the windows run them), against the known
truth of the simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.clock import SystemClock
from agent.config.cleaning import resolve
from agent.config.schema import FuseGroup, SensorConfig, StreamConfig
from agent.pipeline.clean import Cleaner
from agent.pipeline.drift import DriftMonitor
from agent.pipeline.fuse import Member, fuse
from agent.pipeline.windows import Windower
from agent.readings import ChannelStats, Reading

S = 10**9
T0 = 1_800_000_000 * S
WINDOW_S = 10
PER_WINDOW = 10  # readings per window (1 s period)
SIGMA = resolve("temperature", 1.0, None).fuse_sigma  # the default accuracy floor


def simulate(n_sensors: int, n_windows: int, seed: int,
             offsets: np.ndarray | None = None) -> np.ndarray:
    """Readings, shape (sensors, windows, PER_WINDOW): a common cabinet temperature (a daily
    cycle and a random walk), per-sensor bias, gain error and slow local wander (position),
    BME280-like noise and 0.01 degC quantisation; ``offsets`` (same shape) are added."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_windows * PER_WINDOW, dtype=float)  # seconds
    env = 20.0 + 5.0 * np.sin(2 * np.pi * t / 86_400) + np.cumsum(rng.normal(0, 0.003, t.size))
    out = np.empty((n_sensors, t.size))
    for i in range(n_sensors):
        bias = rng.uniform(-0.3, 0.3)
        gain = 1.0 + rng.uniform(-0.005, 0.005)
        steps = rng.normal(0, 0.002, n_windows)
        wander = np.empty(n_windows)
        level = 0.0
        for k in range(n_windows):  # AR(1), correlation time ~1000 windows
            level = 0.999 * level + steps[k]
            wander[k] = level
        out[i] = (env * gain + bias + np.repeat(wander, PER_WINDOW)
                  + rng.normal(0, 0.02, t.size))
    out = out.reshape(n_sensors, n_windows, PER_WINDOW)
    if offsets is not None:
        out = out + offsets
    return np.round(out, 2)


def window_stats(x: np.ndarray) -> list[list[ChannelStats]]:
    """ChannelStats per (sensor, window), computed with numpy."""
    mean, std = x.mean(axis=2), x.std(axis=2, ddof=1)
    lo, hi, last = x.min(axis=2), x.max(axis=2), x[:, :, -1]
    return [[ChannelStats(PER_WINDOW, float(mean[i, k]), float(lo[i, k]), float(hi[i, k]),
                          float(last[i, k]), float(std[i, k]), "degC")
             for k in range(x.shape[1])] for i in range(x.shape[0])]


def names(n: int) -> list[str]:
    return [f"bme{i}.temperature" for i in range(n)]


def run_fusion(x: np.ndarray) -> list[tuple[tuple[str, ...], ChannelStats]]:
    """Flags and fused stats per window, the way the windows fuse a group."""
    n = x.shape[0]
    members = [Member(c, SIGMA) for c in names(n)]
    monitor = DriftMonitor("t", members)
    stats = window_stats(x)
    out = []
    for k in range(x.shape[1]):
        channels = {c: stats[i][k] for i, c in enumerate(names(n))}
        verdict = monitor.update(channels)
        result = fuse("t", members, channels, inflate=verdict.inflate, exclude=verdict.exclude)
        out.append((verdict.flags + result.flags, result.stats))
    return out


def drifting(n_sensors: int, n_windows: int, start: int, rate_per_window: float) -> np.ndarray:
    """Offsets: sensor 0 drifts by ``rate_per_window`` per window from window ``start``."""
    off = np.zeros((n_sensors, n_windows, PER_WINDOW))
    t = np.arange(n_windows * PER_WINDOW, dtype=float) / PER_WINDOW - start  # in windows
    off[0] = (rate_per_window * np.clip(t, 0.0, None)).reshape(n_windows, PER_WINDOW)
    return off


def first_flag(results: list[tuple[tuple[str, ...], ChannelStats]], flag: str) -> int | None:
    for k, (flags, _) in enumerate(results):
        if flag in flags:
            return k
    return None


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_drift_of_0_1_degc_per_window_is_flagged_within_5_windows_among_3(seed: int) -> None:
    start, n = 200, 240
    x = simulate(3, n, seed, drifting(3, n, start, 0.1))
    results = run_fusion(x)
    assert all(not flags for flags, _ in results[:start]), "false flags while healthy"
    drift_at = first_flag(results, "drift:bme0.temperature")
    down_at = first_flag(results, "downweighted:bme0.temperature")
    assert drift_at is not None and drift_at - start < 5
    # Down-weighted before it is excluded.
    assert down_at is not None and down_at < drift_at
    assert not any(f.startswith(("drift:bme1", "drift:bme2", "downweighted:bme1",
                                 "downweighted:bme2")) for flags, _ in results for f in flags)
    # From then on the fused value follows the two healthy sensors (their plain mean here,
    # within a bias of at most 0.3 degC each), not the drifting one.
    healthy = x[1:, :, :].mean(axis=(0, 2))
    for k in range(drift_at, n):
        assert abs(results[k][1].mean - healthy[k]) < 0.35


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_drift_between_two_sensors_is_flagged_within_5_windows(seed: int) -> None:
    start, n = 200, 240
    x = simulate(2, n, seed, drifting(2, n, start, 0.1))
    results = run_fusion(x)
    assert all(not flags for flags, _ in results[:start])
    at = first_flag(results, "drift:t")
    assert at is not None and at - start < 5


def test_a_negative_drift_is_flagged_too() -> None:
    start, n = 100, 130
    x = simulate(3, n, 9, drifting(3, n, start, -0.1))
    results = run_fusion(x)
    at = first_flag(results, "drift:bme0.temperature")
    assert at is not None and at - start < 5


@pytest.mark.slow
def test_healthy_sensors_raise_at_most_one_false_flag_per_channel_in_30_days() -> None:
    n = 30 * 86_400 // WINDOW_S
    for n_sensors, seed in ((3, 11), (2, 12)):
        x = simulate(n_sensors, n, seed)
        results = run_fusion(x)
        per_channel = dict.fromkeys(names(n_sensors), 0)
        for flags, _ in results:
            for c in per_channel:
                # A group flag of a pair names both channels.
                if any(f.endswith(c) or (n_sensors == 2 and f in ("drift:t", "disagreement:t"))
                       for f in flags):
                    per_channel[c] += 1
        assert max(per_channel.values()) <= 1, per_channel


def frozen_run(n_sensors: int, seed: int) -> tuple[int, list[Reading]]:
    """Readings of redundant BME280s at 1 s through the cleaner; sensor 0 freezes at its value
    of reading 120. Returns the index of the first frozen reading and sensor 0's output."""
    x = simulate(n_sensors, 30, seed).reshape(n_sensors, -1)
    freeze = 120
    x[0, freeze:] = x[0, freeze]
    sensors = [SensorConfig(name=f"bme{i}", driver="synthetic", period_s=1.0)
               for i in range(n_sensors)]
    cleaner = Cleaner(sensors, SystemClock(), fuse_groups=[names(n_sensors)])
    out = []
    for k in range(x.shape[1]):
        for i in range(n_sensors):
            r = cleaner.process(Reading(f"bme{i}", "temperature", float(x[i, k]), "degC",
                                        T0 + k * S, k * S))
            assert r is not None
            if i == 0:
                out.append(r)
            else:
                assert r.quality == "good", (k, r.reasons)
    return freeze, out


@pytest.mark.parametrize(("n_sensors", "seed"), [(2, 1), (3, 2), (3, 3)])
def test_a_frozen_sensor_is_flagged_within_10_readings(n_sensors: int, seed: int) -> None:
    freeze, out = frozen_run(n_sensors, seed)
    flagged = [k for k, r in enumerate(out) if "frozen" in r.reasons or "stuck" in r.reasons]
    assert flagged and flagged[0] - freeze < 10
    # Every frozen reading from then on stays out of the windows.
    assert all(out[k].quality == "suspect" for k in range(flagged[0], len(out)))
    assert all(r.quality == "good" for r in out[:freeze])


def test_without_moving_peers_a_steady_value_is_not_called_frozen() -> None:
    sensors = [SensorConfig(name=f"bme{i}", driver="synthetic", period_s=1.0) for i in range(3)]
    cleaner = Cleaner(sensors, SystemClock(), fuse_groups=[names(3)])
    for k in range(40):  # a perfectly still cabinet: every sensor repeats itself
        for i in range(3):
            r = cleaner.process(Reading(f"bme{i}", "temperature", 21.0 + 0.1 * i, "degC",
                                        T0 + k * S, k * S))
            assert r is not None and "frozen" not in r.reasons


def test_the_windows_run_the_drift_monitor_on_their_fuse_groups() -> None:
    start, n = 20, 30
    x = simulate(3, n, 5, drifting(3, n, start, 0.1)).reshape(3, -1)
    sensors = [SensorConfig(name=f"bme{i}", driver="synthetic", period_s=1.0) for i in range(3)]
    stream = StreamConfig(name="env", sensors=[s.name for s in sensors], window_s=WINDOW_S,
                          fuse=[FuseGroup(name="t", channels=names(3))])
    w = Windower([stream], sensors)
    out = []
    for k in range(x.shape[1]):
        for i in range(3):
            w.add(Reading(f"bme{i}", "temperature", float(x[i, k]), "degC", T0 + k * S, k * S))
        out += w.close_due(T0 + (k + 1) * S, 0)
    flagged = [k for k, win in enumerate(out) if "drift:bme0.temperature" in win.flags]
    assert flagged and flagged[0] - start < 5
    assert all(not math.isnan(win.fused["t"].mean) for win in out)


def test_huge_and_odd_windows_neither_raise_nor_blind_the_monitor() -> None:
    members = [Member(c, SIGMA) for c in names(3)]
    monitor = DriftMonitor("t", members)
    odd = [1e308, -1e308, math.inf, math.nan, 0.0]
    for k, v in enumerate(odd * 4):
        channels = {c: ChannelStats(10, v if i == k % 3 else 20.0, v, v, v,
                                    1e300 if k % 2 else math.nan, "degC")
                    for i, c in enumerate(names(3))}
        verdict = monitor.update(channels)
        fuse("t", members, channels, inflate=verdict.inflate, exclude=verdict.exclude)
    # Healthy windows afterwards, then a drift: still caught.
    start, n = 60, 80
    x = simulate(3, n, 7, drifting(3, n, start, 0.1))
    stats = window_stats(x)
    first = None
    for k in range(n):
        verdict = monitor.update({c: stats[i][k] for i, c in enumerate(names(3))})
        if first is None and "drift:bme0.temperature" in verdict.flags:
            first = k
    assert first is not None and start <= first < start + 5


def test_a_sensor_back_in_line_is_trusted_again() -> None:
    n = 160
    off = drifting(3, n, 40, 0.1)
    off[0, 60:] = 0.0  # replaced after 20 windows of drift
    results = run_fusion(simulate(3, n, 8, off))
    flagged = [k for k, (flags, _) in enumerate(results)
               if any(f.endswith("bme0.temperature") for f in flags)]
    assert flagged and flagged[0] < 45
    # Trusted again within the CUSUM's cap (12 windows) and a few more.
    assert max(flagged) < 60 + 16
