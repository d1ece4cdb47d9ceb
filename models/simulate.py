"""Simulated site data for training: weather, traffic and cabinet load on one time grid.

Nothing is downloaded: the training data of the shipped models is generated here from
traffic-flow theory and standard load shapes (see ``weather``, ``traffic_sim``, ``energy_sim``
for the physics). What differs between sites is a ``models.sites.SiteParams``; the default,
preset ``berlin-street``, is a mid-latitude European city (52.5 N, 13.4 E, Europe/Berlin), one
year from 2025-01-01 at 5-minute windows, seed 7. A preset and a seed fix the data exactly.

    python -m models.simulate --preset chicago-arterial --days 365 --out site.csv

writes the same CSV schema a city's own data uses (``models.csvdata``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np

from models.csvdata import SiteData, write_csv
from models.energy_sim import simulate_energy
from models.sites import PRESETS, SiteParams, UnknownPreset, preset
from models.sun import day_of_year, solar_position
from models.traffic_sim import simulate_traffic
from models.weather import simulate_weather

__all__ = ["SiteParams", "local_calendar", "simulate_site"]


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


def simulate_site(p: SiteParams | None = None) -> SiteData:
    p = p or SiteParams()
    rng = np.random.default_rng(p.seed)
    start = int(datetime.fromisoformat(p.start).replace(tzinfo=ZoneInfo(p.timezone)).timestamp())
    start -= start % p.window_s
    ts_s = start + np.arange(p.days * 86_400 // p.window_s, dtype=np.int64) * p.window_s
    # Conditions are evaluated at the middle of each window.
    mid = ts_s + p.window_s / 2
    hour, dow, day_index = local_calendar(mid.astype(np.int64), p.timezone)
    elevation, solar_hour = solar_position(mid, p.lat_deg, p.lon_deg)
    wx = simulate_weather(day_of_year(ts_s), solar_hour, p.window_s, rng, p.climate)
    traffic = simulate_traffic(
        hour=hour, dow=dow, day_index=day_index, temperature=wx.temperature,
        humidity=wx.humidity, raining=wx.raining, step_s=p.window_s, rng=rng,
        road=p.road, demand=p.demand, faults=p.faults,
    )
    energy = simulate_energy(
        ts_s=ts_s, hour=hour, dow=dow, day_index=day_index, elevation=elevation,
        temperature=wx.temperature, raining=wx.raining, step_s=p.window_s, rng=rng,
        cabinet=p.cabinet, faults=p.faults,
    )
    n = len(ts_s)
    sensor_out = np.zeros(n, dtype=bool)
    for s in np.flatnonzero(rng.random(n) < p.window_s / (p.faults.weather_outage_days * 86_400)):
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
    ap.add_argument("--preset", default=SiteParams.name,
                    help=f"site preset ({', '.join(PRESETS)}; default %(default)s)")
    ap.add_argument("--days", type=int, default=SiteParams.days)
    ap.add_argument("--seed", type=int, default=SiteParams.seed)
    ap.add_argument("--start", default=SiteParams.start)
    ap.add_argument("--out", required=True, help="CSV file to write")
    args = ap.parse_args(argv)
    try:
        site = preset(args.preset)
    except UnknownPreset as exc:
        print(f"error: {exc.args[0]}")
        return 2
    data = simulate_site(replace(site, days=args.days, seed=args.seed, start=args.start))
    write_csv(data, args.out)
    print(f"wrote {len(data)} windows of {data.window_s} s ({site.name}, tz {data.timezone}) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
