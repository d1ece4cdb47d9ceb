"""Time-of-day, weekday and day-of-year features of a UTC instant in a model's time zone.

``time_features`` is the definition. ``LocalTime`` gives the same numbers per window without
building a zone-aware datetime each time (the largest single cost of a feature row): the
zone's UTC offset is looked up once per quarter hour of UTC, and the day of the year once per
local day. A quarter whose two ends have different offsets (it holds a daylight-saving
change) is computed by the definition, so every instant gets its own offset.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

TIME_FEATURES = ("hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos")
_QUARTER_S = 900
_DAY_S = 86_400
_TAU = 2 * math.pi


def time_features(ts_s: float, tz: ZoneInfo) -> dict[str, float]:
    local = datetime.fromtimestamp(ts_s, tz=tz)
    hour = local.hour + local.minute / 60 + local.second / 3600
    dow = local.weekday()
    doy = local.timetuple().tm_yday - 1 + hour / 24
    return _named(hour, dow, doy)


def _named(hour: float, dow: int, doy: float) -> dict[str, float]:
    h, d, y = _TAU * hour / 24, _TAU * dow / 7, _TAU * doy / 365.25
    return {
        "hour_sin": math.sin(h), "hour_cos": math.cos(h),
        "dow_sin": math.sin(d), "dow_cos": math.cos(d),
        "doy_sin": math.sin(y), "doy_cos": math.cos(y),
    }


class LocalTime:
    """``time_features`` of one zone, with its offsets and days of the year remembered."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._quarter = -1
        self._offset_s: int | None = None  # None: this quarter holds an offset change
        self._day = -1
        self._yday = 0

    def _offset(self, at_s: int) -> int:
        off = datetime.fromtimestamp(at_s, tz=self.tz).utcoffset()
        return int(off.total_seconds()) if off is not None else 0

    def features(self, ts_s: float) -> dict[str, float]:
        whole = math.floor(ts_s)  # the definition reads whole seconds
        quarter = whole // _QUARTER_S
        if quarter != self._quarter:
            start = quarter * _QUARTER_S
            first, last = self._offset(start), self._offset(start + _QUARTER_S - 1)
            self._quarter, self._offset_s = quarter, first if first == last else None
        if self._offset_s is None:
            return time_features(ts_s, self.tz)
        local = whole + self._offset_s
        day, second = divmod(local, _DAY_S)
        if day != self._day:
            self._day = day
            self._yday = (date(1970, 1, 1) + timedelta(days=day)).timetuple().tm_yday
        hour = second // 3600 + (second % 3600 // 60) / 60 + (second % 60) / 3600
        return _named(hour, (day + 3) % 7, self._yday - 1 + hour / 24)  # 1970-01-01: Thursday
