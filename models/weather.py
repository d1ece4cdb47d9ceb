"""Ambient weather at a street cabinet, as the BME280 in its radiation shield would see it.

A 5-minute series built from: a seasonal mean (the site's ``models.sites.Climate``; the
training site's is mid-latitude continental, coldest in late January), a diurnal cycle (minimum
near 06:00, maximum near 15:00 local solar time), a synoptic anomaly (AR(1) with a three-day
time constant: warm and cold spells) and rain spells from a two-state Markov chain (training
site: about 8 % of the time, spells of a few hours). Relative humidity follows from a dew point
that tracks the daily mean temperature (so it is high at night and low in the afternoon) and is
near saturation while it rains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.sites import Climate


@dataclass(frozen=True)
class Weather:
    temperature: np.ndarray  # degC
    humidity: np.ndarray  # %RH
    raining: np.ndarray  # bool


def saturation_vapour_hpa(t_c: np.ndarray) -> np.ndarray:
    """Magnus formula (WMO, over water)."""
    return 6.112 * np.exp(17.62 * t_c / (243.12 + t_c))


def simulate_weather(
    doy: np.ndarray, solar_hour: np.ndarray, step_s: float, rng: np.random.Generator,
    climate: Climate | None = None,
) -> Weather:
    c = climate or Climate()
    n = len(doy)
    season = c.mean_c - c.season_c * np.cos(2 * np.pi * (doy - c.coldest_doy) / 365.25)
    amp = 3.5 + 2.0 * (season - season.min()) / max(np.ptp(season), 1e-9)
    diurnal = amp * np.cos(2 * np.pi * (solar_hour - 15.0) / 24.0)

    phi = np.exp(-step_s / (3 * 86_400))
    shocks = rng.normal(0.0, 3.5 * np.sqrt(1 - phi**2), n)
    anomaly = np.empty(n)
    acc = rng.normal(0.0, 3.5)
    # Spells: a rain spell starts with a rate of one per ``rain_every_h`` of dry weather and
    # lasts ``rain_spell_h`` on average.
    p_start = step_s / (c.rain_every_h * 3600)
    p_stop = step_s / (c.rain_spell_h * 3600)
    raining = np.zeros(n, dtype=bool)
    wet = False
    u = rng.random(n)
    for i in range(n):
        acc = phi * acc + shocks[i]
        anomaly[i] = acc
        wet = (u[i] > p_stop) if wet else (u[i] < p_start)
        raining[i] = wet

    # Rain cools the air; the effect builds and decays over about an hour.
    cool = np.convolve(raining.astype(float), np.ones(12) / 12, mode="full")[:n] * 2.5
    temperature = season + diurnal + anomaly - cool
    dew = season + anomaly - 3.0 - 0.12 * amp + rng.normal(0, 0.6, n)
    dew = np.minimum(dew, temperature - 0.2)
    rh = 100.0 * saturation_vapour_hpa(dew) / saturation_vapour_hpa(temperature)
    rh = np.where(raining, rng.uniform(92, 100, n), rh)
    return Weather(temperature=temperature, humidity=np.clip(rh, 15.0, 100.0), raining=raining)
