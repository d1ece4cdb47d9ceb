"""A bounded local history of the cabinet circuits the anomaly detectors watch.

For each stream with a ``[streams.anomaly]`` table, every window's circuit means (feed meter,
check meter, lighting circuit, each separately metered charge point, photocell) go into the
history file's ``circuits`` table, one row per stream window. ``edge-agent model history export
--circuits STREAM`` writes them in the anomaly calibration's CSV format (``models.anomaly_csv``),
so each detector's thresholds are calibrated from the cabinet's own first weeks.

Bounded: ``retention_days`` (30 by default: 43,200 rows of 60 s windows, about 3 MB per stream).
"""

from __future__ import annotations

import csv
import logging
import math
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

from agent.anomaly.sample import ChannelMap
from agent.readings import Window

log = logging.getLogger(__name__)

MAX_CHARGERS = 16
_NS = 1_000_000_000
_CHARGERS = tuple(f"charger_{i}_w" for i in range(1, MAX_CHARGERS + 1))
COLUMNS = ("main_w", "check_w", "lights_w", "photocell", *_CHARGERS)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS circuits (
    stream TEXT NOT NULL,
    ts_s INTEGER NOT NULL,             -- start of the stream window, Unix seconds
    window_s REAL NOT NULL,
    {', '.join(f'{c} REAL' for c in COLUMNS)},
    PRIMARY KEY (stream, ts_s)
) WITHOUT ROWID;
"""
_PLACES = ", ".join("?" * (len(COLUMNS) + 3))


def _mean(w: Window, name: str | None) -> float | None:
    if not name:
        return None
    st = w.channels.get(name)
    return st.mean if st is not None and st.count and math.isfinite(st.mean) else None


def circuit_row(w: Window, ch: ChannelMap) -> list[float | None]:
    """The circuit columns of one window (None: not measured)."""
    chargers = [_mean(w, c) for c in ch.chargers[:MAX_CHARGERS]]
    chargers += [None] * (MAX_CHARGERS - len(chargers))
    return [_mean(w, ch.main), _mean(w, ch.check), _mean(w, ch.lights),
            _mean(w, ch.photocell), *chargers]


class CircuitRecorder:
    """Writes the circuit means of the anomaly streams' windows into an open history file."""

    def __init__(self, streams: Mapping[str, ChannelMap], retention_days: float = 30.0) -> None:
        self.streams = dict(streams)
        self.retention_s = retention_days * 86_400
        self.rows_written = 0
        self.errors = 0
        self.last_error = ""

    def observe(self, db: sqlite3.Connection, w: Window) -> None:
        ch = self.streams.get(w.stream)
        if ch is None:
            return
        row = circuit_row(w, ch)
        if all(v is None for v in row):
            return
        start_s = w.start_ns // _NS
        try:
            with db:
                db.execute(f"INSERT OR REPLACE INTO circuits VALUES ({_PLACES})",
                           (w.stream, start_s, (w.end_ns - w.start_ns) / _NS, *row))
                db.execute("DELETE FROM circuits WHERE stream = ? AND ts_s < ?",
                           (w.stream, start_s - self.retention_s))
            self.rows_written += 1
        except sqlite3.Error as exc:  # a full disk must not stop the detectors
            self.errors += 1
            if self.last_error != str(exc):
                log.error("circuit history: %s (rows are not recorded until it clears)", exc)
            self.last_error = str(exc)


def export_circuits(db: sqlite3.Connection, stream: str, out: TextIO, *,
                    since_s: int | None = None) -> int:
    """Write one stream's circuit history as the anomaly calibration CSV; returns the rows.
    Only the charge-point columns that were ever measured are written."""
    lo = since_s if since_s is not None else -2**62
    used = [c for c in _CHARGERS
            if db.execute(f"SELECT 1 FROM circuits WHERE stream = ? AND ts_s >= ? AND {c} "
                          "IS NOT NULL LIMIT 1", (stream, lo)).fetchone()]
    cols = ["main_w", "check_w", "lights_w", "photocell", *used]
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["ts", *cols])
    n = 0
    for r in db.execute(f"SELECT ts_s, {', '.join(cols)} FROM circuits WHERE stream = ? "
                        "AND ts_s >= ? ORDER BY ts_s", (stream, lo)):
        stamp = datetime.fromtimestamp(int(r[0]), tz=UTC).isoformat()
        w.writerow([stamp, *("" if v is None else f"{v:.9g}" for v in r[1:])])
        n += 1
    return n


def circuit_streams(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT DISTINCT stream FROM circuits ORDER BY stream")]
