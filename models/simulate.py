"""Simulated site data for training: weather, traffic and cabinet load on one time grid.

Nothing is downloaded: the training data of the shipped models is generated here from
traffic-flow theory and standard load shapes (see ``weather``, ``traffic_sim``, ``energy_sim``
for the physics and their parameters). The default site is a mid-latitude European city
(52.5 N, 13.4 E, Europe/Berlin), one year from 2025-01-01 at 5-minute windows, seed 7.

    python -m models.simulate --days 365 --out site.csv

writes the same CSV schema a city's own data uses (``models.csvdata``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np

from models.csvdata import SiteData, write_csv
from models.energy_sim import simulate_energy
from models.sun import day_of_year, solar_position
from models.traffic_sim import simulate_traffic
from models.weather import simulate_weather


@dataclass(frozen=True)
class SiteParams:
    days: int = 365
    seed: int = 7
    start: str = "2025-01-01"
    timezone: str = "Europe/Berlin"
    lat_deg: float = 52.5
    lon_deg: float = 13.4
    window_s: int = 300


def local_calendar(ts_s: np.ndarray, tz: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local fractional hour, day of week (Monday = 0) and day index since the first day."""
    zone = ZoneInfo(tz)
    # The UTC offset changes only twice a year: compute it once per hour and broadcast.
    hours = (ts_s // 3600).astype(np.int64)
    uniq, inverse = np.unique(hours, return_inverse=True)
    offsets = np.array(
        [datetime.fromtimestamp(int(h) * 3600, tz=zone).utcoffset().total_seconds()  # type: ignore[union-attr]
         for h in uniq]
    )[inverse]
    local = ts_s + offsets
    day = local // 86_400
    hour = (local % 86_400) / 3600.0
    dow = (day + 3) % 7  # 1970-01-01 was a Thursday
    return hour, dow.astype(np.int64), (day - day[0]).astype(np.int64)


def simulate_site(p: SiteParams = SiteParams()) -> SiteData:
    rng = np.random.default_rng(p.seed)
    start = int(datetime.fromisoformat(p.start).replace(tzinfo=ZoneInfo(p.timezone)).timestamp())
    start -= start % p.window_s
    ts_s = start + np.arange(p.days * 86_400 // p.window_s, dtype=np.int64) * p.window_s
    # Conditions are evaluated at the middle of each window.
    mid = ts_s + p.window_s / 2
    hour, dow, day_index = local_calendar(mid.astype(np.int64), p.timezone)
    elevation, solar_hour = solar_position(mid, p.lat_deg, p.lon_deg)
    wx = simulate_weather(day_of_year(ts_s), solar_hour, p.window_s, rng)
    traffic = simulate_traffic(
        hour=hour, dow=dow, day_index=day_index, temperature=wx.temperature,
        humidity=wx.humidity, raining=wx.raining, step_s=p.window_s, rng=rng,
    )
    energy = simulate_energy(
        ts_s=ts_s, hour=hour, dow=dow, day_index=day_index, elevation=elevation,
        temperature=wx.temperature, raining=wx.raining, step_s=p.window_s, rng=rng,
    )
    n = len(ts_s)
    sensor_out = np.zeros(n, dtype=bool)
    for s in np.flatnonzero(rng.random(n) < p.window_s / (40 * 86_400)):
        sensor_out[s : s + int(rng.integers(6, 36))] = True
    temperature = wx.temperature + rng.normal(0, 0.2, n)
    humidity = np.clip(wx.humidity + rng.normal(0, 1.5, n), 0, 100)
    columns = {
        "vehicles_in": traffic["vehicles_in"],
        "vehicles_out": traffic["vehicles_out"],
        "speed_in_mean": traffic["speed_in_mean"],
        "speed_out_mean": traffic["speed_out_mean"],
        "occupancy": traffic["occupancy"],
        "temperature": np.where(sensor_out, np.nan, temperature),
        "humidity": np.where(sensor_out, np.nan, humidity),
        "power_mean_w": energy["power_mean_w"],
        "anomaly": energy["anomaly"],
    }
    truth = {
        "raining": wx.raining.astype(float),
        "true_speed_in": traffic["true_speed_in"],
        "true_speed_out": traffic["true_speed_out"],
        "incident_in": traffic["incident_in"],
        "incident_out": traffic["incident_out"],
        "true_power_w": energy["true_power_w"],
    }
    return SiteData(p.window_s, ts_s, columns, p.timezone, truth)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.simulate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=SiteParams.days)
    ap.add_argument("--seed", type=int, default=SiteParams.seed)
    ap.add_argument("--start", default=SiteParams.start)
    ap.add_argument("--out", required=True, help="CSV file to write")
    args = ap.parse_args(argv)
    data = simulate_site(SiteParams(days=args.days, seed=args.seed, start=args.start))
    write_csv(data, args.out)
    print(f"wrote {len(data)} windows of {data.window_s} s to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
