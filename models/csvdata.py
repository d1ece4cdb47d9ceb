"""The site-data CSV: the one format training reads, whether the rows are simulated or real.

One row per window (default 300 s), header row required, comma separated::

    column          unit    meaning
    ts              -       window start: ISO 8601 with a UTC offset ("2025-03-01T07:05:00+01:00")
                            or Unix seconds; aligned to a multiple of the window since the epoch
    vehicles_in     count   vehicles detected towards the centre in the window
    vehicles_out    count   vehicles detected away from the centre
    speed_in_mean   m/s     mean speed of the inbound vehicles (empty when there were none)
    speed_out_mean  m/s     mean speed of the outbound vehicles
    occupancy       1       loop-detector occupancy, fraction 0..1 (mean over loops)
    temperature     degC    ambient air temperature
    humidity        %RH     ambient relative humidity
    power_mean_w    W       mean electrical load of the cabinet over the window
    anomaly         0/1     optional label (known faults); used for evaluation only

Columns may come in any order; a model needs only its own (traffic: the vehicle and speed
columns, energy: ``power_mean_w``; both use temperature and humidity when present). An empty
cell, ``nan`` or ``NA`` is a missing value; a missing row is a missing window. These are the
same quantities the gateway derives from its stream windows (see CHANNELS.md), rolled up to the
model's window, so a model retrained on a city's own export runs unchanged on the gateway.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

COLUMNS: dict[str, str] = {
    "vehicles_in": "count",
    "vehicles_out": "count",
    "speed_in_mean": "m/s",
    "speed_out_mean": "m/s",
    "occupancy": "1",
    "temperature": "degC",
    "humidity": "%RH",
    "power_mean_w": "W",
    "anomaly": "1",
}
MISSING = frozenset({"", "nan", "na", "null", "none"})


class SiteDataError(ValueError):
    """A CSV that does not follow the schema; the message names the file, line and column."""


@dataclass
class SiteData:
    """Windows on a regular grid: ``ts_s[i] = ts_s[0] + i * window_s``; NaN marks missing."""

    window_s: int
    ts_s: np.ndarray
    columns: dict[str, np.ndarray]
    timezone: str = "UTC"
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # simulator-only, not in the CSV

    def __len__(self) -> int:
        return len(self.ts_s)

    def col(self, name: str) -> np.ndarray:
        got = self.columns.get(name)
        return np.full(len(self.ts_s), np.nan) if got is None else got

    def slice(self, start: int, stop: int) -> SiteData:
        return SiteData(
            self.window_s, self.ts_s[start:stop],
            {k: v[start:stop] for k, v in self.columns.items()}, self.timezone,
            {k: v[start:stop] for k, v in self.truth.items()},
        )


def _parse_ts(text: str, where: str) -> int:
    text = text.strip()
    try:
        return int(float(text))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SiteDataError(f"{where}: ts {text!r} is neither ISO 8601 nor Unix seconds") from None
    if dt.tzinfo is None:
        raise SiteDataError(f"{where}: ts {text!r} has no UTC offset")
    return int(dt.timestamp())


def _parse_value(text: str, where: str) -> float:
    if text.strip().lower() in MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise SiteDataError(f"{where}: {text!r} is not a number") from None


def read_csv(path: str | Path, window_s: int = 300, tz: str = "UTC") -> SiteData:
    """Read and validate a site CSV onto a regular grid of ``window_s`` windows."""
    path = Path(path)
    try:
        ZoneInfo(tz)
    except Exception:
        raise SiteDataError(f"{tz!r} is not a known IANA time zone") from None
    rows: dict[int, dict[str, float]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if "ts" not in header:
            raise SiteDataError(f"{path}:1: the header has no 'ts' column (got {header})")
        unknown = [c for c in header if c != "ts" and c not in COLUMNS]
        if unknown:
            raise SiteDataError(
                f"{path}:1: unknown column(s) {unknown}; known: ts, {', '.join(COLUMNS)}"
            )
        for lineno, row in enumerate(reader, start=2):
            ts = _parse_ts(row["ts"] or "", f"{path}:{lineno}")
            if ts % window_s:
                raise SiteDataError(
                    f"{path}:{lineno}: ts {row['ts']} is not aligned to {window_s} s windows"
                )
            if ts in rows:
                raise SiteDataError(f"{path}:{lineno}: a second row for ts {row['ts']}")
            rows[ts] = {
                c: _parse_value(row[c] or "", f"{path}:{lineno}: column {c}")
                for c in header if c != "ts"
            }
    if len(rows) < 2:
        raise SiteDataError(f"{path}: needs at least two data rows, got {len(rows)}")
    first, last = min(rows), max(rows)
    ts_s = np.arange(first, last + window_s, window_s, dtype=np.int64)
    index = {int(t): i for i, t in enumerate(ts_s)}
    cols = {c: np.full(len(ts_s), np.nan) for c in header if c != "ts"}
    for ts, values in rows.items():
        for c, v in values.items():
            cols[c][index[ts]] = v
    return SiteData(window_s, ts_s, cols, tz)


def write_csv(data: SiteData, path: str | Path) -> None:
    tz = ZoneInfo(data.timezone)
    names = [c for c in COLUMNS if c in data.columns]
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", *names])
        for i, ts in enumerate(data.ts_s):
            stamp = datetime.fromtimestamp(int(ts), tz=UTC).astimezone(tz).isoformat()
            w.writerow([stamp, *(_fmt(data.columns[c][i]) for c in names)])


def _fmt(v: float) -> str:
    if math.isnan(v):
        return ""
    return f"{v:.6g}"
