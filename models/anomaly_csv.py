"""Anomaly thresholds from a cabinet's exported history: the site-calibration path.

    python -m models.anomaly_eval --calibrate HISTORY.csv --lat 41.88 --lon -87.63 \\
        --tz America/Chicago [--days 14] [--declared-w 240] --out thresholds.json

The CSV follows the conventions of ``models.csvdata`` (header row, ``ts`` as ISO 8601 with a
UTC offset or Unix seconds at the window start, empty / ``nan`` / ``NA`` = missing, a missing
row = a missing window) with the circuit columns the detectors need, one row per energy
stream window (60 s by default)::

    column          unit  meaning
    ts              -     window start
    main_w          W     feed meter, window mean (``power_mean_w`` is accepted for it)
    check_w         W     second meter on the same feed; optional
    lights_w        W     street-lighting circuit
    charger_1_w ..  W     each separately metered charge point, numbered from 1; optional
    photocell       1     fraction of the window the photocell called for light; optional

Solar elevation and local time are computed from the site's position and time zone. The
first ``days`` days are used (all rows if not given); faults in them are tolerated (see
``agent.anomaly.calibrate``). The result goes into ``[streams.anomaly] thresholds``.
"""

from __future__ import annotations

import csv
import math
import re
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from agent.anomaly import SiteInfo, Thresholds
from agent.anomaly.calibrate import History, calibrate
from models.anomaly_sim import local_time
from models.sun import solar_position

MISSING = frozenset({"", "nan", "na", "null", "none"})
MAX_DAYS = 120.0  # a calibration wants weeks; more is a mistake, and memory is bounded
MIN_DAYS = 3.0
CHARGER = re.compile(r"charger_([1-9][0-9]?)_w")


class HistoryCsvError(ValueError):
    """A history CSV that cannot be used; the message names the file, line and column."""


def _ts(text: str, where: str) -> int:
    text = text.strip()
    try:
        v = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(v) or abs(v) > 1e11:
            raise HistoryCsvError(f"{where}: ts {text!r} is not a plausible Unix time")
        return int(v)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HistoryCsvError(f"{where}: ts {text!r} is neither ISO 8601 nor Unix "
                              "seconds") from None
    if dt.tzinfo is None:
        raise HistoryCsvError(f"{where}: ts {text!r} has no UTC offset")
    return int(dt.timestamp())


def _value(text: str, where: str) -> float:
    if text.strip().lower() in MISSING:
        return math.nan
    try:
        v = float(text)
    except ValueError:
        raise HistoryCsvError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v) or abs(v) > 1e7:
        raise HistoryCsvError(f"{where}: {text!r} is not a plausible power or fraction")
    return v


def _columns(header: list[str], where: str) -> tuple[str, list[str]]:
    """The feed column's name and the charger columns in number order; checks the rest."""
    known = {"ts", "main_w", "power_mean_w", "check_w", "lights_w", "photocell"}
    chargers = sorted((c for c in header if CHARGER.fullmatch(c)),
                      key=lambda c: int(c.split("_")[1]))
    unknown = [c for c in header if c not in known and c not in chargers]
    if unknown:
        raise HistoryCsvError(f"{where}: unknown column(s) {unknown}")
    for need in ("ts", "lights_w"):
        if need not in header:
            raise HistoryCsvError(f"{where}: the header has no {need!r} column")
    feeds = [c for c in ("main_w", "power_mean_w") if c in header]
    if len(feeds) != 1:
        raise HistoryCsvError(f"{where}: needs exactly one of 'main_w' or 'power_mean_w'")
    numbers = [int(c.split("_")[1]) for c in chargers]
    if numbers != list(range(1, len(numbers) + 1)):
        raise HistoryCsvError(f"{where}: charger columns must be numbered 1..n, got {chargers}")
    if len(set(header)) != len(header):
        raise HistoryCsvError(f"{where}: a column appears twice")
    return feeds[0], chargers


def read_history(path: str | Path, site: SiteInfo, *, window_s: int = 60,
                 days: float | None = None) -> History:
    """The first ``days`` of ``path`` (all rows if None) as a ``History`` on a regular grid."""
    path = Path(path)
    if not 10 <= window_s <= 3600:
        raise HistoryCsvError(f"window {window_s} s: expected 10 to 3600")
    try:
        zone = ZoneInfo(site.timezone)
    except Exception:
        raise HistoryCsvError(f"{site.timezone!r} is not a known IANA time zone") from None
    if not (-90 <= site.lat_deg <= 90 and -180 <= site.lon_deg <= 180):
        raise HistoryCsvError(f"position {site.lat_deg}, {site.lon_deg} is not on Earth")
    if days is not None and not MIN_DAYS <= days <= MAX_DAYS:
        raise HistoryCsvError(f"days {days}: expected {MIN_DAYS:g} to {MAX_DAYS:g}")
    span = MAX_DAYS if days is None else days
    rows: dict[int, list[float]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            feed, chargers = _columns(header, f"{path}:1")
            names = [feed, "check_w", "lights_w", *chargers, "photocell"]
            index = {c: i for i, c in enumerate(header)}
            first: int | None = None
            for lineno, row in enumerate(reader, start=2):
                where = f"{path}:{lineno}"
                if len(row) != len(header):
                    raise HistoryCsvError(f"{where}: {len(row)} fields, the header has "
                                          f"{len(header)}")
                ts = _ts(row[index["ts"]], where)
                if ts % window_s:
                    raise HistoryCsvError(f"{where}: ts is not aligned to {window_s} s windows")
                first = ts if first is None else min(first, ts)
                if ts - first >= span * 86_400:
                    continue
                if ts in rows:
                    raise HistoryCsvError(f"{where}: a second row for the same ts")
                rows[ts] = [_value(row[index[c]], f"{where}: column {c}") if c in index
                            else math.nan for c in names]
    except OSError as exc:
        raise HistoryCsvError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise HistoryCsvError(f"{path}: not UTF-8") from None
    except csv.Error as exc:
        raise HistoryCsvError(f"{path}: not CSV: {exc}") from None
    if not rows:
        raise HistoryCsvError(f"{path}: no data rows")
    t0 = min(rows)
    rows = {t: v for t, v in rows.items() if t - t0 < span * 86_400}
    ts_s = np.arange(t0, max(rows) + window_s, window_s, dtype=np.int64)
    if len(ts_s) * window_s < MIN_DAYS * 86_400:
        raise HistoryCsvError(f"{path}: {len(ts_s) * window_s / 86_400:.1f} days of history; "
                              f"calibration needs at least {MIN_DAYS:g}")
    grid = np.full((len(ts_s), len(names)), np.nan)
    for t, v in rows.items():
        grid[(t - t0) // window_s] = v
    mid = ts_s + window_s / 2
    elevation, _ = solar_position(mid, site.lat_deg, site.lon_deg)
    hour, _, _ = local_time(mid.astype(np.int64), zone.key)
    k = len(names) - 4
    return History(window_s, grid[:, 0], grid[:, 1], grid[:, 2],
                   grid[:, 3:3 + k].reshape(len(ts_s), k), grid[:, -1],
                   np.asarray(elevation, dtype=float), np.asarray(hour, dtype=float))


def calibrate_from_csv(path: str | Path, site: SiteInfo, *, window_s: int = 60,
                       days: float | None = 14.0, target_false_alarms_per_30d: float = 1.0,
                       declared_w: float = 0.0) -> Thresholds:
    """Thresholds for the site whose exported history is ``path`` (its first ``days``)."""
    h = read_history(path, site, window_s=window_s, days=days)
    return calibrate(h, target_false_alarms_per_30d, declared_w=declared_w)


def write_history(path: str | Path, h: History, ts_s: np.ndarray, tz: str) -> None:
    """``h`` in the format ``read_history`` reads (the simulator's runs, for tests and demos)."""
    zone = ZoneInfo(tz)
    k = h.chargers_w.shape[1]
    cols = [h.main_w, h.check_w, h.lights_w, *(h.chargers_w[:, j] for j in range(k)),
            h.photocell]
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", "main_w", "check_w", "lights_w",
                    *(f"charger_{j + 1}_w" for j in range(k)), "photocell"])
        for i, t in enumerate(ts_s.tolist()):
            stamp = datetime.fromtimestamp(int(t), tz=zone).isoformat()
            w.writerow([stamp, *("" if math.isnan(c[i]) else f"{c[i]:.10g}" for c in cols)])
