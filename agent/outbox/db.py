"""The outbox's SQLite file: schema, batched commits, bounds, sequence floor, salvage.

Everything here is blocking and runs on the outbox's single worker thread (``agent.outbox.store``
owns that thread and is the only caller); the connection never leaves it.

Sequence numbers must never be published twice for different messages, even when the file is
lost. Three sources bound the next ``seq`` at open:

* ``meta.last_seq`` in the database: exact, committed with the rows it covers;
* a side file ``<path>.seq`` holding a reservation ``reserved`` (a seq not yet used), rewritten
  with fsync before any seq at or beyond it is committed or published; it survives the database
  being moved aside, restored from elsewhere, or rolled back by a power cut (WAL with
  synchronous=NORMAL can lose its last commits then);
* the sent marker ``<path>.sent``: the highest seq published before its commit (publish-through;
  ``agent.outbox.seqfiles``);
* wall-clock milliseconds, only when there is neither a database nor a side file.

The exact value (the larger of ``last_seq`` and the sent marker) is used when the database is the
one the side file describes and either the last stop was clean or the machine has not rebooted
since (a killed process loses nothing from the WAL or the page cache). Otherwise the reservation
is used and the skipped range is reported.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal, cast

from agent.outbox.export import export_rows
from agent.outbox.recovery import (
    OUTBOX_APP_ID,
    aside_name,
    check_outbox_path,
    is_corrupt,
    keep_foreign_wal,
    move_aside,
    prune_aside,
    salvage,
)
from agent.outbox.rows import (
    DROP_ORDER,
    ROW_OVERHEAD_BYTES,
    Batch,
    Dropped,
    Kind,
    Row,
    Snapshot,
)
from agent.outbox.seqfiles import SentMarker, read_reservation, write_reservation

log = logging.getLogger(__name__)

SEQ_BLOCK: Final = 10_000  # seqs reserved per side-file write (one fsync per block)
QUARANTINE_KEEP: Final = 1_000  # newest quarantined rows kept for inspection
CORRUPT_KEEP: Final = 3  # moved-aside files (damaged or foreign) kept
ASIDE_MIN_BYTES: Final = 64 * 1024 * 1024  # ...within max(this, max_bytes) bytes in all

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_kind_seq ON outbox(kind, seq);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    quarantined_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class OpenInfo:
    next_seq: int
    skipped: tuple[int, int] | None  # seqs never used because the exact floor was unknown
    snapshot: Snapshot


def _int(text: str | None) -> int:
    """A seq from the meta table (input from disk): 0 when absent or not a number."""
    try:
        return max(0, min(int(text or 0), 2**63 - 1))
    except ValueError:
        log.error("outbox meta last_seq %r is not a number; ignored", str(text)[:40])
        return 0


def kernel_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""  # unknown: treated as "rebooted", the safe side


class OutboxDB:
    def __init__(self, path: Path, *, max_rows: int, max_bytes: int, max_age_ns: int | None,
                 wall_ns: Callable[[], int]) -> None:
        self.path = path
        self.seq_path = path.with_name(path.name + ".seq")
        self.sent = SentMarker(path.with_name(path.name + ".sent"))
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_age_ns = max_age_ns
        self._wall_ns = wall_ns
        self._conn: sqlite3.Connection | None = None
        self._db_id = ""
        self._reserved = 0
        self.snap = Snapshot()

    # -- open / close ---------------------------------------------------------------------

    def open(self) -> OpenInfo:
        """Open or create the outbox; OutboxPathError if the path holds something else."""
        check_outbox_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_foreign_wal(self.path, self._stamp()):  # else SQLite would replay it
            self._prune()
        try:
            return self._open_once()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            aside = self._move_aside(exc)
            info = self._open_once()
            top = self._salvage(aside)
            if top >= info.next_seq:  # no reservation covered the salvaged rows
                info.next_seq = top + 1
                self.snap.last_seq = top
                self._reserve(top + 1 + SEQ_BLOCK)
            info.snapshot = self.snap
            self._prune()
            return info

    def _stamp(self) -> str:
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._wall_ns() / 1e9))

    def _prune(self) -> None:
        prune_aside(self.path, CORRUPT_KEEP, max(ASIDE_MIN_BYTES, self.max_bytes))

    def _salvage(self, aside: Path, held: int = 0) -> int:
        """Copy what can be read of the moved-aside file into the open one; its top seq.
        ``held``: the rows the file was known to hold, if known (a reset while running)."""
        got = salvage(aside, self._c())
        got.unreadable = max(got.unreadable, held - got.copied)
        self._rescan(max(self.snap.last_seq, got.last_seq))
        self.snap.salvaged += got.copied
        self.snap.unreadable += got.unreadable
        log.error("%s: salvaged %d messages (and %d quarantined) from the damaged file %s; "
                  "%d could not be read", self.path, got.copied, got.quarantine_copied, aside,
                  got.unreadable)
        return got.last_seq

    def _open_once(self) -> OpenInfo:
        conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn = conn
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: journal_mode is {mode}, not wal")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=2000")
            # Keep the WAL small beside max_bytes: by default it grows to ~4 MiB before a
            # checkpoint, which alone can fill a small state partition.
            wal_pages = max(64, min(1000, self.max_bytes // (8 * 4096)))
            conn.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            conn.execute(f"PRAGMA journal_size_limit={wal_pages * 4096}")
            conn.executescript(_SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            stamp = conn.execute("PRAGMA application_id").fetchone()[0] != OUTBOX_APP_ID
            if stamp:
                conn.execute(f"PRAGMA application_id={OUTBOX_APP_ID}")
            self._rescan()
        except BaseException:
            conn.close()
            self._conn = None
            raise
        kboot = kernel_boot_id()
        side = read_reservation(self.seq_path)
        last = max(_int(meta.get("last_seq")), self.snap.last_seq)
        fresh = "db_id" not in meta
        self._db_id = meta.get("db_id") or uuid.uuid4().hex
        sent = self.sent.read(self._db_id) if not fresh else 0
        trusted = (not fresh and side is not None and side[0] == self._db_id
                   and sent is not None
                   and (meta.get("clean") == "1" or (kboot != "" and meta.get("kboot") == kboot)))
        if trusted or (side is None and not fresh and sent is not None):
            next_seq = max(last, sent or 0) + 1
        elif side is not None:
            next_seq = max(last + 1, side[1])
        else:
            next_seq = max(last + 1, self._wall_ns() // 1_000_000)
        skipped = (last + 1, next_seq - 1) if next_seq > last + 1 and not fresh else None
        if skipped and (trusted or side is None):
            log.warning("%s: seqs %d..%d were published before their commit when the agent "
                        "stopped (the cloud may have them or not); they are not used again",
                        self.path, skipped[0], skipped[1])
        elif skipped:
            log.warning("%s: seq floor taken from %s: seqs %d..%d are never used",
                        self.path, self.seq_path, skipped[0], skipped[1])
        self._put_meta({"db_id": self._db_id, "clean": "0", "kboot": kboot,
                        "last_seq": str(next_seq - 1)})
        if stamp or fresh:
            # The identity goes into the main file now, outside the WAL, so that a WAL can be
            # checked against it (agent.outbox.recovery).
            self._c().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            self._reserve(next_seq + SEQ_BLOCK)
        except OSError as exc:
            # A full disk must not stop the agent from starting (systemd would restart it in a
            # loop): the next commit tries the reservation again before it uses a seq.
            log.error("%s: cannot reserve seqs (%s); retrying at the next commit",
                      self.seq_path, exc)
            self._reserved = next_seq
        self.snap.last_seq = next_seq - 1
        self.snap.reserved = self._reserved
        self.sent.open(self._db_id, next_seq - 1)
        return OpenInfo(next_seq, skipped, self.snap)

    def close(self, *, clean: bool) -> None:
        if self._conn is None:
            return
        try:
            if clean:
                self._put_meta({"clean": "1"})
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.error("%s: closing: %s", self.path, exc)
        finally:
            self._conn.close()
            self._conn = None
            self.sent.close()

    def _put_meta(self, values: dict[str, str]) -> None:
        c = self._c()
        c.execute("BEGIN IMMEDIATE")
        c.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())
        c.execute("COMMIT")

    def _rescan(self, last_seq: int | None = None) -> None:
        """Recount from the tables; ``last_seq`` keeps a known value instead of MAX(seq)."""
        c = self._c()
        snap = Snapshot(corrupt_resets=self.snap.corrupt_resets, salvaged=self.snap.salvaged,
                        unreadable=self.snap.unreadable, reserved=self.snap.reserved,
                        version=self.snap.version + 1)
        for kind, n, size in c.execute(
                "SELECT kind, COUNT(*), SUM(length(topic) + length(payload)) FROM outbox "
                "GROUP BY kind"):
            snap.rows[kind] = n
            snap.bytes[kind] = int(size or 0) + n * ROW_OVERHEAD_BYTES
        top = c.execute("SELECT MAX(seq) FROM outbox").fetchone()[0] or 0
        qtop = c.execute("SELECT MAX(seq) FROM quarantine").fetchone()[0] or 0
        snap.last_seq = max(top, qtop) if last_seq is None else last_seq
        snap.quarantined = c.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        self.snap = snap
        self._oldest()

    # -- sequence reservation -------------------------------------------------------------

    def _reserve(self, reserved: int) -> None:
        write_reservation(self.seq_path, self._db_id, reserved)
        self._reserved = reserved
        self.snap.reserved = reserved

    # -- corruption -----------------------------------------------------------------------

    def _move_aside(self, exc: BaseException) -> Path:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        aside = aside_name(self.path, "corrupt", self._stamp())
        move_aside(self.path, aside)
        log.error("%s is corrupt (%s): moved aside to %s; salvaging what can be read into a "
                  "new outbox", self.path, exc, aside)
        self.snap.corrupt_resets += 1
        return aside

    def _reset(self, exc: BaseException) -> None:
        last = self.snap.last_seq
        held = self.total_rows()
        aside = self._move_aside(exc)
        # The fresh file starts from the reservation; the loop keeps its own next seq.
        self._open_once()
        self._salvage(aside, held)
        self.snap.last_seq = max(self.snap.last_seq, last)
        self._prune()

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError(f"{self.path}: outbox database is not open")
        return self._conn

    # -- commits --------------------------------------------------------------------------

    def commit(self, batch: Batch) -> list[Dropped]:
        try:
            return self._commit_once(batch)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            self._reset(exc)
            # The salvaged rows keep their seqs: acks, attempts and quarantines still apply.
            return self._commit_once(batch)

    def _rollback(self, last_seq: int) -> None:
        """Undo a failed transaction and re-read the counters it had already moved."""
        c = self._conn
        if c is None:
            return
        try:
            if c.in_transaction:
                c.execute("ROLLBACK")
            self._rescan(last_seq)
        except sqlite3.Error as exc:
            log.debug("%s: rollback: %s", self.path, exc)

    def _commit_once(self, batch: Batch) -> list[Dropped]:
        c = self._c()
        top = max(batch.top, max((r.seq for r in batch.rows), default=0))
        # Ahead of need: publish-through hands out only seqs below the reservation.
        if top + SEQ_BLOCK // 2 >= self._reserved:
            self._reserve(top + SEQ_BLOCK)
        committed_last = self.snap.last_seq
        c.execute("BEGIN IMMEDIATE")
        try:
            cur = c.executemany(
                "INSERT OR IGNORE INTO outbox(seq, kind, topic, payload, created_ns, attempts) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(r.seq, r.kind, r.topic, r.payload, r.created_ns, r.attempts) for r in batch.rows])
            for r in batch.rows:
                self._count(r.kind, r.size, +1)
            # A batch retried after a timeout may already be in: recount rather than guess.
            recount = cur.rowcount != len(batch.rows)
            for r in batch.acks:
                if c.execute("DELETE FROM outbox WHERE seq = ?", (r.seq,)).rowcount:
                    self._count(r.kind, r.size, -1)
            c.executemany("UPDATE outbox SET attempts = ? WHERE seq = ?",
                          [(n, s) for s, n in batch.attempts.items()])
            for r, reason in batch.quarantine:
                self._quarantine(c, r, reason)
            if top > self.snap.last_seq:
                self.snap.last_seq = top
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_seq', ?)",
                          (str(top),))
            if recount:
                self._rescan(self.snap.last_seq)
            dropped = self._enforce(c, batch.protect)
            c.execute("COMMIT")
        except BaseException:
            self._rollback(committed_last)
            raise
        self._oldest()
        self.snap.version += 1
        return dropped

    def _quarantine(self, c: sqlite3.Connection, r: Row, reason: str) -> None:
        moved = c.execute(
            "INSERT OR REPLACE INTO quarantine(seq, kind, topic, payload, created_ns, attempts, "
            "quarantined_ns, reason) SELECT seq, kind, topic, payload, created_ns, ?, ?, ? "
            "FROM outbox WHERE seq = ?", (r.attempts, self._wall_ns(), reason, r.seq)).rowcount
        if moved:
            c.execute("DELETE FROM outbox WHERE seq = ?", (r.seq,))
            self._count(r.kind, r.size, -1)
            self.snap.quarantined += 1
            c.execute("DELETE FROM quarantine WHERE seq IN (SELECT seq FROM quarantine "
                      "ORDER BY seq DESC LIMIT -1 OFFSET ?)", (QUARANTINE_KEEP,))

    def _count(self, kind: str, size: int, sign: int) -> None:
        self.snap.rows[kind] = self.snap.rows.get(kind, 0) + sign
        self.snap.bytes[kind] = self.snap.bytes.get(kind, 0) + sign * size

    def _oldest(self) -> None:
        row = self._c().execute("SELECT created_ns FROM outbox ORDER BY seq LIMIT 1").fetchone()
        self.snap.oldest_created_ns = None if row is None else int(row[0])

    def total_rows(self) -> int:
        return sum(self.snap.rows.values())

    def total_bytes(self) -> int:
        return sum(self.snap.bytes.values())

    def _enforce(self, c: sqlite3.Connection, protect: frozenset[int]) -> list[Dropped]:
        out: list[Dropped] = []
        if self.max_age_ns is not None:
            out += self._drop_expired(c, protect, self._wall_ns() - self.max_age_ns)
        for kind in DROP_ORDER:
            if self.total_rows() <= self.max_rows and self.total_bytes() <= self.max_bytes:
                break
            out += self._drop_kind(c, kind, protect)
        return out

    def _drop_kind(self, c: sqlite3.Connection, kind: Kind,
                   protect: frozenset[int]) -> list[Dropped]:
        by_reason = {"rows": 0, "bytes": 0}
        after = 0
        while True:
            cands = c.execute(
                "SELECT seq, length(topic) + length(payload) FROM outbox WHERE kind = ? "
                "AND seq > ? ORDER BY seq LIMIT 512", (kind, after)).fetchall()
            if not cands:
                break
            gone: list[tuple[int]] = []
            for seq, size in cands:
                after = seq
                if seq in protect:
                    continue
                over_rows = self.total_rows() > self.max_rows
                if not over_rows and self.total_bytes() <= self.max_bytes:
                    break
                gone.append((seq,))
                by_reason["rows" if over_rows else "bytes"] += 1
                self._count(kind, size + ROW_OVERHEAD_BYTES, -1)
            c.executemany("DELETE FROM outbox WHERE seq = ?", gone)
            if self.total_rows() <= self.max_rows and self.total_bytes() <= self.max_bytes:
                break
        return [Dropped(kind, cast("Literal['rows', 'bytes']", r), n)
                for r, n in by_reason.items() if n]

    def _drop_expired(self, c: sqlite3.Connection, protect: frozenset[int],
                      cutoff_ns: int) -> list[Dropped]:
        counts: dict[Kind, int] = {}
        after = 0
        while True:
            cands = c.execute(
                "SELECT seq, kind, length(topic) + length(payload), created_ns FROM outbox "
                "WHERE seq > ? ORDER BY seq LIMIT 512", (after,)).fetchall()
            gone: list[tuple[int]] = []
            done = not cands
            for seq, kind, size, created in cands:
                after = seq
                if created >= cutoff_ns:
                    done = True
                    break
                if seq in protect:
                    continue
                gone.append((seq,))
                counts[kind] = counts.get(kind, 0) + 1
                self._count(kind, size + ROW_OVERHEAD_BYTES, -1)
            c.executemany("DELETE FROM outbox WHERE seq = ?", gone)
            if done:
                break
        return [Dropped(k, "age", n) for k, n in counts.items()]

    # -- reads ----------------------------------------------------------------------------

    def fetch(self, after: int, upto: int, limit: int, skip: frozenset[int]) -> list[Row]:
        """Rows with ``after < seq <= upto`` in seq order, leaving out ``skip``."""
        query = ("SELECT seq, kind, topic, payload, created_ns, attempts FROM outbox "
                 "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?")
        params = (after, upto, limit + len(skip))
        try:
            rows = self._c().execute(query, params).fetchall()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            self._reset(exc)
            rows = self._c().execute(query, params).fetchall()  # what was salvaged
        out = [Row(s, k, t, bytes(p), cr, a) for s, k, t, p, cr, a in rows if s not in skip]
        return out[:limit]

    def export_chunk(self, fh: IO[str], table: str, after: int, limit: int) -> tuple[int, int]:
        """Append up to ``limit`` rows of ``table`` after seq ``after`` to ``fh`` as JSON lines;
        returns (rows written, last seq)."""
        return export_rows(self._c(), fh, table, after, limit)

    def quarantined_rows(self, limit: int) -> list[tuple[int, str, str, int, str]]:
        """Newest quarantined rows: (seq, kind, topic, attempts, reason)."""
        return [(int(s), str(k), str(t), int(a), str(r)) for s, k, t, a, r in self._c().execute(
            "SELECT seq, kind, topic, attempts, reason FROM quarantine ORDER BY seq DESC "
            "LIMIT ?", (limit,))]
