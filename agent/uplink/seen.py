"""Command ids already received, in SQLite beside the outbox, so a repeat never runs twice.

The broker redelivers a QoS 1 command after a reconnect, and the cloud retries one it got no
answer to; both may come after the agent restarted. Each accepted request is written here
*before* its handler runs (state ``running``), and its reply once it has one (``done``). A
repeat is answered with the stored reply; a repeat of one whose run was cut short by a stop or
a crash is refused as ``duplicate``: a state-changing command runs at most once.

Bounded: an id is kept until its command expires (plus the clock-skew allowance) -- after that
the expiry check refuses the repeat on its own -- and at most ``MAX_ROWS`` ids are kept, the
oldest forgotten first. Replies above ``MAX_REPLY_BYTES`` are not kept (a repeat of one is
answered ``duplicate``).

Each request costs one small transaction on the event loop's thread. Commands are rare (a few
a minute at most), so a worker thread would cost more than it saves. A file that is not a
readable SQLite database is moved aside and a new one started: forgetting ids is better than
refusing every command.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

SEEN_FILE: Final = "commands.db"  # beside the outbox
MAX_ROWS: Final = 10_000
MAX_REPLY_BYTES: Final = 16 * 1024
PRUNE_EVERY: Final = 64  # inserts between two prunes

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS seen (
    name TEXT NOT NULL,
    id TEXT NOT NULL,
    received_ns INTEGER NOT NULL,
    keep_until_ns INTEGER NOT NULL,
    reply BLOB,
    state TEXT NOT NULL,
    PRIMARY KEY (name, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_received ON seen (received_ns);
"""


class SeenCommands:
    def __init__(self, path: Path, *, max_rows: int = MAX_ROWS) -> None:
        self.path = path
        self.max_rows = max_rows
        self._db: sqlite3.Connection | None = None
        self._inserts = 0
        self.pruned = 0

    def open(self) -> None:
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if not self.path.is_file() or isinstance(exc, sqlite3.OperationalError):
                raise  # cannot open at all (no directory, no permission): not a bad file
            aside = self.path.with_name(f"{self.path.name}.bad-{time.time_ns()}")
            log.warning("%s: not a readable table of command ids (%s): moved to %s, starting "
                        "a new one", self.path, exc, aside.name)
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._db = self._connect()
        self.prune()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM seen").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def lookup(self, name: str, req_id: str) -> tuple[str, bytes | None] | None:
        """``(state, reply)`` for an id seen before and not yet forgotten; else None."""
        if self._db is None:
            return None
        row = self._db.execute("SELECT state, reply FROM seen WHERE name = ? AND id = ? AND "
                               "keep_until_ns >= ?", (name, req_id, time.time_ns())).fetchone()
        return None if row is None else (str(row[0]), row[1])

    def begin(self, name: str, req_id: str, keep_until_ns: int) -> None:
        if self._db is None:
            return
        self._db.execute("INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?, NULL, 'running')",
                         (name, req_id, time.time_ns(), keep_until_ns))
        self._inserts += 1
        if self._inserts % PRUNE_EVERY == 0:
            self.prune()

    def finish(self, name: str, req_id: str, reply: bytes) -> None:
        if self._db is None:
            return
        kept = reply if len(reply) <= MAX_REPLY_BYTES else None
        self._db.execute("UPDATE seen SET reply = ?, state = ? WHERE name = ? AND id = ?",
                         (kept, "done" if kept is not None else "too_large", name, req_id))

    def forget(self, name: str, req_id: str) -> None:
        """A request the cloud may retry (``busy``): its id is not spent."""
        if self._db is not None:
            self._db.execute("DELETE FROM seen WHERE name = ? AND id = ?", (name, req_id))

    def prune(self) -> None:
        if self._db is None:
            return
        cur = self._db.execute("DELETE FROM seen WHERE keep_until_ns < ?", (time.time_ns(),))
        gone = max(0, cur.rowcount)
        (count,) = self._db.execute("SELECT count(*) FROM seen").fetchone()
        if count > self.max_rows:
            cur = self._db.execute(
                "DELETE FROM seen WHERE (name, id) IN (SELECT name, id FROM seen "
                "ORDER BY received_ns LIMIT ?)", (count - self.max_rows,))
            gone += max(0, cur.rowcount)
        self.pruned += gone

    def __len__(self) -> int:
        if self._db is None:
            return 0
        (count,) = self._db.execute("SELECT count(*) FROM seen").fetchone()
        return int(count)
