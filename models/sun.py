"""Sun position from a UTC timestamp (simplified NOAA / Spencer formulas, ~0.5 deg accurate).

Street lighting in the energy simulation switches on a photocell, i.e. on solar elevation; the
weather's diurnal cycle follows local solar time. Both come from here.
"""

from __future__ import annotations

import numpy as np

DAY_S = 86_400.0


def day_of_year(ts_s: np.ndarray) -> np.ndarray:
    """Day of year 0..365 (UTC), via numpy datetime64 so leap years are right."""
    t = np.asarray(ts_s, dtype="int64").astype("datetime64[s]")
    start = t.astype("datetime64[Y]").astype("datetime64[s]")
    return np.asarray((t - start).astype("int64") / DAY_S, dtype=float)


def solar_position(
    ts_s: np.ndarray, lat_deg: float, lon_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Solar elevation (deg) and local solar time (h, 0..24) at each UTC timestamp."""
    ts_s = np.asarray(ts_s, dtype=float)
    doy = day_of_year(ts_s)
    hour_utc = np.mod(ts_s, DAY_S) / 3600.0
    g = 2 * np.pi / 365.0 * (doy + (hour_utc - 12) / 24)
    eot_min = 229.18 * (
        0.000075 + 0.001868 * np.cos(g) - 0.032077 * np.sin(g)
        - 0.014615 * np.cos(2 * g) - 0.040849 * np.sin(2 * g)
    )
    decl = (
        0.006918 - 0.399912 * np.cos(g) + 0.070257 * np.sin(g) - 0.006758 * np.cos(2 * g)
        + 0.000907 * np.sin(2 * g) - 0.002697 * np.cos(3 * g) + 0.00148 * np.sin(3 * g)
    )
    solar_time_h = np.mod(hour_utc + (eot_min + 4 * lon_deg) / 60.0, 24.0)
    ha = np.radians(15.0 * (solar_time_h - 12.0))
    lat = np.radians(lat_deg)
    sin_el = np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.cos(ha)
    return np.degrees(np.arcsin(np.clip(sin_el, -1, 1))), solar_time_h
