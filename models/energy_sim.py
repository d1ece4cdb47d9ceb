"""Electrical load of a street cabinet that feeds street lights and EV charge points.

Load shapes (all powers in W, built on a 1-minute grid and averaged to the window; the site's
numbers are in ``models.sites.Cabinet`` and ``Faults``, the values quoted are the training
site's):

- **Street lighting:** 24 LED luminaires of 55 W on a photocell: on when the sun is below a
  switching elevation (-2 deg +/- 0.7 deg from night to night, 1.5 deg earlier under rain
  clouds), off at dawn; dimmed to 50 % from 23:00 to 05:00 local time ("midnight dimming").
  Luminaires fail now and then (-55 W each) until a crew replaces them two to six weeks later.
- **EV charging:** an 11 kW and a 7.4 kW AC point. Arrivals are Poisson with a time-of-day rate
  (weekday peaks after 08:00 and 17:00, a weekend midday hump, scaled by the site's
  ``ev_arrivals``); a driver takes the first free point and leaves if all are busy. A car
  draws min(point, on-board charger) (3.7, 7.4 or 11 kW) for 85 % of the energy it wants
  (log-normal, median 14 kWh), then tapers linearly to zero (constant-voltage phase).
- **Cabinet electronics:** 45 W base (controllers, router, gateway) plus 8 W standby per charge
  point; a 200 W heater on a thermostat (on below 5 degC inside, off above 10 degC) and a 40 W
  fan (on above 35 degC, off below 30 degC). Inside temperature = outside + 4 K self-heating +
  up to 8 K solar gain.
- **Meter:** 0.5 % + 2 W noise per window; outages (no data) and labelled anomalies for
  evaluating the anomaly score: single-window meter spikes, lights that fail to switch on (or
  stay on) for a night/day, and unexplained extra loads of 0.4-0.9 kW for 1-4 h.
"""

from __future__ import annotations

import numpy as np

from models.sites import Cabinet, Faults


def _arrival_rate_per_h(hour: np.ndarray, dow: np.ndarray, scale: float) -> np.ndarray:
    def bump(c: float, w: float) -> np.ndarray:
        return np.exp(-0.5 * ((hour - c) / w) ** 2)

    weekday = 0.04 + 0.55 * bump(8.5, 1.0) + 0.25 * bump(12.5, 1.5) + 0.7 * bump(17.8, 1.4)
    weekend = 0.04 + 0.45 * bump(13.0, 3.0)
    return np.where(dow < 5, weekday, weekend) * scale


def _charging(
    minute_hour: np.ndarray, minute_dow: np.ndarray, rng: np.random.Generator, cab: Cabinet,
) -> np.ndarray:
    """EV power (W) on the 1-minute grid."""
    n = len(minute_hour)
    power = np.zeros(n)
    points = cab.chargers_kw
    busy_until = [0] * len(points)
    rate = _arrival_rate_per_h(minute_hour, minute_dow, cab.ev_arrivals)
    arrivals = np.flatnonzero(rng.random(n) < rate / 60)
    for t in arrivals:
        free = [p for p in range(len(points)) if busy_until[p] <= t]
        if not free:
            continue
        point = free[0]
        car_kw = rng.choice([3.7, 7.4, 11.0], p=[0.2, 0.35, 0.45])
        p_kw = min(points[point], car_kw) * rng.uniform(0.95, 1.0)
        want_kwh = float(np.clip(rng.lognormal(np.log(14.0), 0.5), 2.0, 60.0))
        bulk_min = round(0.85 * want_kwh / p_kw * 60)
        taper_min = max(round(0.30 * want_kwh / p_kw * 60), 1)
        profile = np.concatenate(
            [np.full(bulk_min, p_kw), np.linspace(p_kw, 0.0, taper_min, endpoint=False)]
        )
        seg = power[t : t + len(profile)]
        seg += profile[: len(seg)] * 1000.0
        dwell = len(profile) + int(rng.lognormal(np.log(30.0), 0.8))
        busy_until[point] = int(t) + dwell
    return power


def simulate_energy(
    *, ts_s: np.ndarray, hour: np.ndarray, dow: np.ndarray, day_index: np.ndarray,
    elevation: np.ndarray, temperature: np.ndarray, raining: np.ndarray, step_s: float,
    rng: np.random.Generator, cabinet: Cabinet | None = None, faults: Faults | None = None,
) -> dict[str, np.ndarray]:
    """Window-level load in the CSV schema's energy column, plus labels for evaluation."""
    cab, faults = cabinet or Cabinet(), faults or Faults()
    lum, lum_w = cab.luminaires, cab.luminaire_w
    n = len(ts_s)
    sub = int(step_s // 60)
    # 1-minute grid: each window's minutes share its weather and day, with minute-resolved time.
    m_hour = (np.repeat(hour, sub) + np.tile(np.arange(sub), n) / 60.0) % 24
    m_dow = np.repeat(dow, sub)
    ev = _charging(m_hour, m_dow, rng, cab).reshape(n, sub).mean(axis=1)

    days = int(day_index.max()) + 1
    switch_el = rng.normal(-2.0, 0.7, days)[day_index] + np.where(raining, 1.5, 0.0)
    lit = elevation < switch_el
    failed = np.zeros(n)
    fail_p = step_s / (faults.luminaire_failure_days * 86_400)
    for start in np.flatnonzero(rng.random(n) < fail_p):
        failed[start : start + int(rng.integers(14, 43) * 86_400 // step_s)] += 1
    dimmed = (hour >= 23) | (hour < 5)
    lights = lit * (lum - np.minimum(failed, lum)) * lum_w
    lights *= np.where(dimmed, 0.5, 1.0) * 1.04  # 4 % driver losses

    inside = temperature + 4.0 + 8.0 * np.clip(np.sin(np.radians(elevation)), 0, None)
    heater = np.zeros(n)
    fan = np.zeros(n)
    h_on = f_on = False
    for i in range(n):
        h_on = inside[i] < 10.0 if h_on else inside[i] < 5.0
        f_on = inside[i] > 30.0 if f_on else inside[i] > 35.0
        heater[i] = cab.heater_w * h_on
        fan[i] = cab.fan_w * f_on
    base = cab.base_w + len(cab.chargers_kw) * cab.standby_w + rng.normal(0, 1.5, n)

    anomaly = np.zeros(n)
    extra = np.zeros(n)
    steps_day = int(86_400 // step_s)
    for start in np.flatnonzero(rng.random(n) < step_s / (faults.extra_load_days * 86_400)):
        length = int(rng.integers(12, 49))
        extra[start : start + length] += rng.uniform(400, 900)
        anomaly[start : start + length] = 1
    for d in np.flatnonzero(rng.random(days) < faults.lights_fault_day_p):
        span = slice(d * steps_day, (d + 1) * steps_day)
        lit_day = lit[span]
        if not lit_day.any():
            continue
        # Half the faults leave the lights dark all night, half keep them on all day.
        if rng.random() < 0.5:
            lights[span] = np.where(lit_day, 0.0, lights[span])
            anomaly[span] = np.maximum(anomaly[span], lit_day)
        else:
            on_w = (lum - min(failed[span][0], lum)) * lum_w * 1.04
            lights[span] = np.where(lit_day, lights[span], on_w)
            anomaly[span] = np.maximum(anomaly[span], ~lit_day)

    load = base + lights + ev + heater + fan + extra
    measured = load * (1 + rng.normal(0, 0.005, n)) + rng.normal(0, 2.0, n)
    spikes = rng.random(n) < step_s / (faults.meter_spike_days * 86_400)
    measured = np.where(spikes, measured * rng.uniform(2.0, 4.0, n) + 500.0, measured)
    anomaly = np.where(spikes, 1.0, anomaly)
    outage = np.zeros(n, dtype=bool)
    outage_p = step_s / (faults.meter_outage_days * 86_400)
    for start in np.flatnonzero(rng.random(n) < outage_p):
        outage[start : start + int(rng.integers(3, 60))] = True
    return {
        "power_mean_w": np.where(outage, np.nan, measured),
        "anomaly": np.where(outage, 0.0, anomaly),
        "true_power_w": load,
    }
