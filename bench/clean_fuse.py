"""Readings per second through clean + windows + fusion, beside a raw baseline.

The baseline builds the same Readings from the same pre-generated values and appends them to a
list; the measured loop builds them and runs ``Cleaner.process`` and ``Windower.add``, closing
windows every 512 readings as the pipeline does per batch. Both run in this process, on one
core, one after the other, best of ``--repeat``.

    python -m bench.clean_fuse [--readings N] [--repeat R]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.clock import SystemClock
from agent.config.schema import FuseGroup, SensorConfig, StreamConfig
from agent.pipeline.clean import Cleaner, fuse_groups
from agent.pipeline.windows import Windower
from agent.readings import Reading

S = 10**9
T0 = 1_800_000_000 * S
BATCH = 512

# (sensor, driver, quantity, unit, level, noise): three redundant BME280s, a PZEM meter.
CHANNELS = [
    *[(f"bme{i}", "synthetic", q, u, lvl, sd) for i in range(3)
      for q, u, lvl, sd in (("temperature", "degC", 21.0, 0.02), ("humidity", "%RH", 45.0, 0.1),
                            ("pressure", "Pa", 101_325.0, 3.0))],
    ("meter", "synthetic", "active_power", "W", 350.0, 2.0),
    ("meter", "synthetic", "voltage", "V", 230.0, 0.3),
]


def configs() -> tuple[list[SensorConfig], list[StreamConfig]]:
    names = sorted({c[0] for c in CHANNELS})
    sensors = [SensorConfig(name=n, driver="synthetic", period_s=1.0) for n in names]
    fuse = [FuseGroup(name=q, channels=[f"bme{i}.{q}" for i in range(3)])
            for q in ("temperature", "humidity", "pressure")]
    streams = [StreamConfig(name="cabinet", sensors=names, window_s=10.0, fuse=fuse)]
    return sensors, streams


Fields = tuple[str, str, float, str, int, int]


def workload(n: int, seed: int = 1) -> list[Fields]:
    """Readings as plain fields: one per channel per second, with a spike now and then."""
    rng = random.Random(seed)
    out: list[Fields] = []
    t = 0
    while len(out) < n:
        for sensor, _driver, quantity, unit, level, sd in CHANNELS:
            value = level + sd * rng.gauss(0.0, 1.0) + sd * math.sin(t / 300.0)
            if rng.random() < 0.002:
                value += 50 * sd  # a spike
            ts = T0 + t * S + len(out)  # distinct timestamps: no duplicates to drop
            out.append((sensor, quantity, value, unit, ts, ts - T0))
        t += 1
    return out[:n]


def baseline(items: list[Fields]) -> float:
    sink: list[Reading] = []
    start = time.perf_counter()
    for sensor, quantity, value, unit, ts, mono in items:
        sink.append(Reading(sensor, quantity, value, unit, ts, mono))
    return time.perf_counter() - start


def clean_fuse(items: list[Fields]) -> tuple[float, int, int]:
    sensors, streams = configs()
    cleaner = Cleaner(sensors, SystemClock(), fuse_groups=fuse_groups(streams))
    windower = Windower(streams, sensors)
    windows = 0
    flagged = 0
    start = time.perf_counter()
    for i, (sensor, quantity, value, unit, ts, mono) in enumerate(items):
        r = cleaner.process(Reading(sensor, quantity, value, unit, ts, mono))
        if r is not None:
            if r.reasons:
                flagged += 1
            windower.add(r)
        if i % BATCH == BATCH - 1:
            windows += len(windower.close_due(ts, 0))
    windows += len(windower.flush())
    return time.perf_counter() - start, windows, flagged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--readings", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    items = workload(args.readings)
    base = min(baseline(items) for _ in range(args.repeat))
    runs = [clean_fuse(items) for _ in range(args.repeat)]
    best, windows, flagged = min(runs)
    n = len(items)
    print(f"readings: {n} over {len(CHANNELS)} channels, 3 fuse groups, 10 s windows")
    print(f"raw baseline (build Reading + list.append): {n / base:>12,.0f} readings/s")
    print(f"clean + windows + fusion:                   {n / best:>12,.0f} readings/s "
          f"({best / n * 1e6:.2f} us/reading)")
    print(f"ratio (clean+fuse time / baseline time):    {best / base:>12.1f} x")
    print(f"windows closed: {windows}, readings flagged: {flagged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
