"""Solar elevation for one instant, stdlib only (NOAA / Spencer series, about 0.5 deg).

The gateway needs it once a window to tell whether street lights should be on whatever the
photocell says; the training simulation uses the vectorised twin in ``models.sun``.
"""

from __future__ import annotations

import calendar
import math
import time

DAY_S = 86_400.0


def solar_elevation_deg(ts_s: float, lat_deg: float, lon_deg: float) -> float:
    """Elevation of the sun's centre above the horizon at UTC timestamp ``ts_s``."""
    year_start = calendar.timegm((time.gmtime(ts_s).tm_year, 1, 1, 0, 0, 0))
    doy = (math.floor(ts_s) - year_start) / DAY_S  # fractional, as in models.sun
    hour_utc = (ts_s % DAY_S) / 3600.0
    g = 2.0 * math.pi / 365.0 * (doy + (hour_utc - 12.0) / 24.0)
    eot_min = 229.18 * (
        0.000075 + 0.001868 * math.cos(g) - 0.032077 * math.sin(g)
        - 0.014615 * math.cos(2 * g) - 0.040849 * math.sin(2 * g)
    )
    decl = (
        0.006918 - 0.399912 * math.cos(g) + 0.070257 * math.sin(g)
        - 0.006758 * math.cos(2 * g) + 0.000907 * math.sin(2 * g)
        - 0.002697 * math.cos(3 * g) + 0.00148 * math.sin(3 * g)
    )
    solar_h = (hour_utc + (eot_min + 4.0 * lon_deg) / 60.0) % 24.0
    ha = math.radians(15.0 * (solar_h - 12.0))
    lat = math.radians(lat_deg)
    sin_el = math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(ha)
    return math.degrees(math.asin(max(-1.0, min(1.0, sin_el))))
