"""A bounded local history of model windows, for calibrating the models to this site.

Every stream window that feeds a configured model is rolled up into the aligned model window
(300 s for the shipped models) it falls in; a model window's row is written to SQLite once the
streams have moved past it, in the columns of the site-data CSV (``models.csvdata``):

    vehicles_in / vehicles_out / speed_in_mean / speed_out_mean / occupancy   (traffic stream)
    power_mean_w                                                              (energy stream)
    temperature / humidity                          (any stream's weather channels, mean)

``edge-agent model history export`` writes the rows as that CSV, so ``edge-agent model train
--csv`` makes a site model from the gateway's own history, and the anomaly calibration reads
the same file. A model window covered less than ``MIN_COVERAGE`` by its stream (the agent
started or stopped inside it, a sensor was down) keeps its levels (speeds, load) but not its
vehicle counts, which would read as too little traffic.

Bounded: rows older than ``retention_days`` are deleted as new ones arrive; 60 days of 300 s
rows are 17,280 rows, about 1.5 MB. One insert per model window: negligible flash wear. Kept
across restarts; a row is written once, so a restart loses at most the open model window.
"""

from __future__ import annotations

import csv
import logging
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from agent.anomaly.sample import ChannelMap
from agent.pipeline.circuits import SCHEMA as CIRCUITS_SCHEMA
from agent.pipeline.circuits import CircuitRecorder, circuit_streams, export_circuits
from agent.readings import ChannelStats, Window

log = logging.getLogger(__name__)

COLUMNS = ("vehicles_in", "vehicles_out", "speed_in_mean", "speed_out_mean", "occupancy",
           "temperature", "humidity", "power_mean_w")
TRAFFIC_COLUMNS = COLUMNS[:5]
MIN_COVERAGE = 0.9  # of the model window, for vehicle counts to be kept
APPLICATION_ID = 0x45414869  # "EAHi": PRAGMA application_id of a history file
_NS = 1_000_000_000
_PLACES = ", ".join("?" * (len(COLUMNS) + 4))
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS windows (
    ts_s INTEGER PRIMARY KEY,          -- start of the model window, Unix seconds
    window_s INTEGER NOT NULL,
    {', '.join(f'{c} REAL' for c in COLUMNS)},
    traffic_covered_s REAL NOT NULL,
    energy_covered_s REAL NOT NULL
) WITHOUT ROWID;
"""


class HistoryError(RuntimeError):
    """The history file cannot be opened or is not a history file; the message names it."""


def _finite(x: float) -> bool:
    return isinstance(x, float | int) and math.isfinite(x)


@dataclass
class _Sums:
    """What the stream windows of one model window add up to."""

    traffic_s: float = 0.0  # time covered by windows of a traffic stream
    vehicles: float = 0.0
    n_in: float = 0.0
    s_in: float = 0.0
    n_out: float = 0.0
    s_out: float = 0.0
    dir_known: bool = True  # every vehicle count came with its direction
    occ: float = 0.0
    occ_s: float = 0.0
    energy_s: float = 0.0
    power: float = 0.0
    power_s: float = 0.0
    weather: dict[str, list[float]] = field(default_factory=lambda: {"temperature": [0.0, 0.0],
                                                                    "humidity": [0.0, 0.0]})


def _by_quantity(w: Window) -> dict[str, list[ChannelStats]]:
    out: dict[str, list[ChannelStats]] = {}
    for name, s in w.channels.items():
        if s.count:
            out.setdefault(name.rsplit(".", 1)[-1], []).append(s)
    return out


def _add_weather(acc: _Sums, w: Window, g: Mapping[str, list[ChannelStats]]) -> None:
    for q in ("temperature", "humidity"):
        fused = w.fused.get(q)
        values = ([fused.mean] if fused is not None and math.isfinite(fused.mean)
                  else [s.mean for s in g.get(q, ()) if math.isfinite(s.mean)])
        if values:
            slot = acc.weather[q]
            slot[0] += sum(values) / len(values)
            slot[1] += 1


def _add_traffic(acc: _Sums, w: Window, g: Mapping[str, list[ChannelStats]], dur: float) -> None:
    d = w.derived
    radar_in, radar_out = g.get("speed_in", []), g.get("speed_out", [])
    n_in = float(sum(s.count for s in radar_in))
    n_out = float(sum(s.count for s in radar_out))
    vehicles = d.get("vehicles", math.nan)
    if not _finite(vehicles):
        if radar_in or radar_out:
            vehicles = n_in + n_out
        elif "vehicle_count" in g:
            vehicles = sum(s.mean * s.count for s in g["vehicle_count"])
    if not _finite(vehicles):
        return
    acc.traffic_s += dur
    acc.vehicles += vehicles
    if n_in + n_out != vehicles:
        acc.dir_known = False
    acc.n_in += n_in
    acc.s_in += sum(s.mean * s.count for s in radar_in)
    acc.n_out += n_out
    acc.s_out += sum(s.mean * s.count for s in radar_out)
    occ = d.get("occupancy", math.nan)
    if not _finite(occ):
        occs = [s.mean for s in g.get("occupancy", ()) if math.isfinite(s.mean)]
        occ = sum(occs) / len(occs) if occs else math.nan
    if _finite(occ):
        acc.occ += occ * dur
        acc.occ_s += dur


def _add_energy(acc: _Sums, w: Window, g: Mapping[str, list[ChannelStats]], dur: float) -> None:
    power = w.derived.get("power_mean_w", math.nan)
    if not _finite(power):
        meters = g.get("active_power") or g.get("power") or []
        power = sum(s.mean for s in meters) if meters else math.nan
    if _finite(power):
        acc.energy_s += dur
        acc.power += power * dur
        acc.power_s += dur


def row_of(acc: _Sums, window_s: int) -> dict[str, float]:
    """A model window's CSV columns (NaN: missing) from its sums."""
    nan = math.nan
    row = dict.fromkeys(COLUMNS, nan)
    if acc.traffic_s > 0:
        row["speed_in_mean"] = acc.s_in / acc.n_in if acc.n_in else nan
        row["speed_out_mean"] = acc.s_out / acc.n_out if acc.n_out else nan
        row["occupancy"] = acc.occ / acc.occ_s if acc.occ_s else nan
        if acc.traffic_s >= MIN_COVERAGE * window_s:
            if acc.dir_known:
                row["vehicles_in"], row["vehicles_out"] = acc.n_in, acc.n_out
            else:
                # Loops count without a direction: the total is what flow needs; the split is
                # unknown, so no direction gets the speed weights of the other.
                row["vehicles_in"], row["vehicles_out"] = acc.vehicles, 0.0
                row["speed_in_mean"] = row["speed_out_mean"] = nan
    if acc.power_s > 0:
        row["power_mean_w"] = acc.power / acc.power_s
    for q, (total, n) in acc.weather.items():
        if n:
            row[q] = total / n
    return row


class HistoryRecorder:
    """Rolls the stream windows of the models' streams up into model windows and stores them.

    ``traffic_streams`` and ``energy_streams`` name the streams whose windows give the traffic
    and the energy columns; weather comes from every window. Windows may arrive out of order by
    up to ``grace_s``; a model window is written once every stream is past its end by that much.
    """

    def __init__(self, path: str | Path, *, window_s: int = 300,
                 traffic_streams: Iterable[str] = (), energy_streams: Iterable[str] = (),
                 retention_days: float = 60.0, grace_s: float = 120.0,
                 circuits: Mapping[str, ChannelMap] | None = None,
                 circuit_days: float = 30.0) -> None:
        self.path = Path(path)
        self.circuits = CircuitRecorder(circuits or {}, circuit_days)
        self.window_s = window_s
        self.traffic = frozenset(traffic_streams)
        self.energy = frozenset(energy_streams)
        self.retention_s = retention_days * 86_400
        self.grace_ns = int(grace_s * _NS)
        self._open: dict[int, _Sums] = {}
        self._latest_end_ns = 0
        self._written_until_ns = 0  # model windows starting before this are written
        self.late_windows = 0
        self._db: sqlite3.Connection | None = None
        self.rows_written = 0
        self.errors = 0
        self.last_error = ""

    # -- storage ------------------------------------------------------------------------

    def open(self) -> None:
        self._db = open_history(self.path, create=True)

    def close(self) -> None:
        self.flush(everything=True)
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self, start_s: int, acc: _Sums) -> None:
        if self._db is None:
            return
        row = row_of(acc, self.window_s)
        if all(math.isnan(v) for v in row.values()) or not self.window_s:
            return
        values = [None if math.isnan(row[c]) else row[c] for c in COLUMNS]
        try:
            with self._db:
                self._db.execute(
                    f"INSERT OR REPLACE INTO windows VALUES ({_PLACES})",
                    (start_s, self.window_s, *values, acc.traffic_s, acc.energy_s))
                self._db.execute("DELETE FROM windows WHERE ts_s < ?",
                                 (start_s - self.retention_s,))
            self.rows_written += 1
        except sqlite3.Error as exc:  # a full disk must not stop the models
            self.errors += 1
            if self.last_error != str(exc):
                log.error("model history %s: %s (rows are not recorded until it clears)",
                          self.path, exc)
            self.last_error = str(exc)

    # -- rolling up ---------------------------------------------------------------------

    def observe(self, w: Window) -> None:
        """Feed any stream's window (in the order windows close)."""
        if w.stream in self.circuits.streams and self._db is not None:
            self.circuits.observe(self._db, w)
        if not self.window_s:
            return  # no model configured: circuits only
        is_traffic, is_energy = w.stream in self.traffic, w.stream in self.energy
        span_ns = self.window_s * _NS
        g = _by_quantity(w)
        dur = (w.end_ns - w.start_ns) / _NS
        start = w.start_ns // span_ns * span_ns
        if start < self._written_until_ns:
            self.late_windows += 1  # its model window is written already
            return
        acc = self._open.get(start)
        if acc is None:
            acc = self._open[start] = _Sums()
        _add_weather(acc, w, g)
        if is_traffic:
            _add_traffic(acc, w, g, dur)
        if is_energy:
            _add_energy(acc, w, g, dur)
        self._latest_end_ns = max(self._latest_end_ns, w.end_ns)
        self.flush()

    def flush(self, *, everything: bool = False) -> None:
        span_ns = self.window_s * _NS
        for start in sorted(self._open):
            if not everything and start + span_ns > self._latest_end_ns - self.grace_ns:
                break
            self._write(start // _NS, self._open.pop(start))
            self._written_until_ns = max(self._written_until_ns, start + span_ns)

    def status(self) -> dict[str, object]:
        return {"path": str(self.path), "rows_written": self.rows_written,
                "circuit_rows_written": self.circuits.rows_written,
                "circuit_errors": self.circuits.errors,
                "late_windows": self.late_windows, "errors": self.errors,
                "last_error": self.last_error or None}


def open_history(path: Path, *, create: bool) -> sqlite3.Connection:
    """The history database at ``path``; refuses a file that is not one (never overwrites)."""
    if not create and not path.is_file():
        raise HistoryError(f"{path}: no model history here (is [history] path right?)")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False)
        else:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as exc:
        raise HistoryError(f"{path}: not a model history file ({exc})") from None
    if app_id != APPLICATION_ID and (app_id != 0 or tables):
        db.close()
        raise HistoryError(f"{path}: not a model history file (another SQLite database)")
    if create:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if app_id == 0:
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.executescript(_SCHEMA + CIRCUITS_SCHEMA)
    return db


@dataclass(frozen=True)
class HistoryRow:
    ts_s: int
    window_s: int
    values: dict[str, float]


def read_rows(path: Path, *, since_s: int | None = None) -> Iterator[HistoryRow]:
    """The stored model windows, oldest first (read-only: safe beside a running agent).
    Opens the file at once, so a missing or foreign file raises before any row is used."""
    db = open_history(path, create=False)
    return _rows(db, path, since_s)


def _rows(db: sqlite3.Connection, path: Path, since_s: int | None) -> Iterator[HistoryRow]:
    try:
        cur = db.execute(
            f"SELECT ts_s, window_s, {', '.join(COLUMNS)} FROM windows "
            "WHERE ts_s >= ? ORDER BY ts_s", (since_s if since_s is not None else -2**62,))
        for r in cur:
            yield HistoryRow(int(r[0]), int(r[1]),
                             {c: math.nan if v is None else float(v)
                              for c, v in zip(COLUMNS, r[2:], strict=True)})
    except sqlite3.Error as exc:
        raise HistoryError(f"{path}: cannot be read ({exc})") from None
    finally:
        db.close()


def export_csv(db_path: Path, out: TextIO, *, since_s: int | None = None,
               circuits: str = "") -> int:
    """Write the history as the site-data CSV (``models.csvdata``); returns the rows written.
    Times are UTC with their offset; give the site's time zone to training (``--tz``). With
    ``circuits`` = a stream name: that stream's circuit history, as the anomaly calibration's
    CSV (``models.anomaly_csv``)."""
    if circuits:
        db = open_history(db_path, create=False)
        try:
            known = circuit_streams(db)
            if circuits not in known:
                raise HistoryError(f"{db_path}: no circuit history of stream {circuits!r} "
                                   f"(recorded: {', '.join(known) or 'none'})")
            return export_circuits(db, circuits, out, since_s=since_s)
        except sqlite3.Error as exc:
            raise HistoryError(f"{db_path}: cannot be read ({exc})") from None
        finally:
            db.close()
    rows = read_rows(db_path, since_s=since_s)
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["ts", *COLUMNS])
    n = 0
    for row in rows:
        stamp = datetime.fromtimestamp(row.ts_s, tz=UTC).isoformat()
        w.writerow([stamp, *("" if math.isnan(v) else f"{v:.9g}" for v in row.values.values())])
        n += 1
    return n
