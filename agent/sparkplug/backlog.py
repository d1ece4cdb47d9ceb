"""The Sparkplug store-and-forward backlog: one SQLite row per DDATA-to-be (a device and its
readings), bounded, kept across restarts, replayed oldest first as historical data.

WAL with ``synchronous=NORMAL``: a commit is a write to the log without an fsync, about 0.1 ms,
so rows are written on the event loop (only while the broker is away, one row per device per
``interval_s``). A file that cannot be opened or is corrupt is moved aside and started afresh:
the agent's own outbox is the durable feed, this one must never stop the node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
from pathlib import Path

from agent.readings import Quality, Reading

log = logging.getLogger(__name__)

SCHEMA = """CREATE TABLE IF NOT EXISTS backlog (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    readings TEXT NOT NULL
)"""


def _row(readings: list[Reading]) -> str:
    return json.dumps([[r.quantity, r.value if math.isfinite(r.value) else None, r.unit,
                        r.ts_ns, r.quality] for r in readings], separators=(",", ":"))


QUALITIES: dict[str, Quality] = {"good": "good", "suspect": "suspect", "bad": "bad"}


def _readings(device: str, text: str) -> list[Reading]:
    out = []
    for quantity, value, unit, ts_ns, quality in json.loads(text):
        out.append(Reading(sensor=device, quantity=str(quantity),
                           value=math.nan if value is None else float(value), unit=str(unit),
                           ts_ns=int(ts_ns), mono_ns=0, quality=QUALITIES[quality]))
    return out


class Backlog:
    def __init__(self, path: Path, max_rows: int) -> None:
        self.path = path
        self.max_rows = max_rows
        self.dropped = 0
        self.unreadable = 0
        self._db = self._open()
        self._count: int = int(self._db.execute("SELECT count(*) FROM backlog").fetchone()[0])

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.error("sparkplug: backlog %s unusable (%s): moved to %s, starting empty",
                      self.path, exc, aside)
            with contextlib.suppress(OSError):
                self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    self.path.with_name(self.path.name + suffix).unlink()
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(SCHEMA)
            db.execute("SELECT count(*) FROM backlog").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def __len__(self) -> int:
        return self._count

    def append(self, device: str, readings: list[Reading]) -> None:
        with self._db:
            self._db.execute("INSERT INTO backlog (device, readings) VALUES (?, ?)",
                             (device, _row(readings)))
            self._count += 1
            if self._count > self.max_rows:
                over = self._count - self.max_rows
                self._db.execute("DELETE FROM backlog WHERE id IN "
                                 "(SELECT id FROM backlog ORDER BY id LIMIT ?)", (over,))
                self._count -= over
                self.dropped += over

    def oldest(self, limit: int) -> list[tuple[int, str, list[Reading]]]:
        """Up to ``limit`` rows, oldest first; a row that does not parse is deleted and
        counted."""
        out = []
        rows = self._db.execute("SELECT id, device, readings FROM backlog ORDER BY id LIMIT ?",
                                (limit,)).fetchall()
        for row_id, device, text in rows:
            try:
                out.append((row_id, device, _readings(device, text)))
            except (ValueError, TypeError, KeyError, RecursionError):
                self.unreadable += 1
                self.remove([row_id])
        return out

    def remove(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._db:
            cur = self._db.executemany("DELETE FROM backlog WHERE id = ?", [(i,) for i in ids])
            self._count -= cur.rowcount if cur.rowcount >= 0 else len(ids)

    def close(self) -> None:
        self._db.close()
