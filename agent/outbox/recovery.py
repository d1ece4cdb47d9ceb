"""Whose file is at the outbox path, and what is saved when a file is foreign or damaged.

Identity: an outbox database carries ``PRAGMA application_id = OUTBOX_APP_ID`` in its header
and a random ``db_id`` in its ``meta`` table. Both are checkpointed into the main file when it
is created, so they are on disk outside any WAL and a WAL can be checked against them:

* ``check_outbox_path`` reads the raw header: anything but an empty file, an outbox, or an
  outbox written before the application id existed (``outbox`` and ``meta`` tables) is refused
  and never renamed, overwritten or opened for writing;
* ``foreign_wal`` reads ``db_id`` from the main file alone (``immutable=1`` ignores the WAL) and
  through the WAL (read-only: closing it never checkpoints); a WAL that changes it belongs to
  another database;
* ``salvage`` copies every row that can still be read out of a damaged file into the new one,
  and counts those that cannot;
* files moved aside are kept, within a count and byte budget; the oldest beyond it are deleted
  with a log line naming each.

Everything here is blocking and runs on the outbox's worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

OUTBOX_APP_ID: Final = 0x4F555442  # "OUTB"
SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_APP_ID_OFFSET: Final = 68  # https://www.sqlite.org/fileformat.html#application_id
SUFFIXES: Final = ("", "-wal", "-shm")
ASIDE_LABELS: Final = ("corrupt", "foreign")
SALVAGE_CHUNK: Final = 256
_CORRUPT_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB


class OutboxPathError(Exception):
    """The outbox path names a file that is not this kind of outbox: it is left alone."""


def is_corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the file is damaged (rather than busy, full or unreadable)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.DatabaseError) or code is None:
        return False
    return (code & 0xFF) in _CORRUPT_CODES


def _ro(path: Path, *, immutable: bool = False) -> sqlite3.Connection:
    flag = "immutable=1" if immutable else "mode=ro"
    return sqlite3.connect(f"{path.resolve().as_uri()}?{flag}", uri=True, isolation_level=None)


def _legacy_outbox(path: Path) -> bool:
    """An outbox from before the application id: its tables say so."""
    try:
        conn = _ro(path, immutable=True)
    except sqlite3.Error:
        return False
    try:
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return {"outbox", "meta"} <= names


def check_outbox_path(path: Path) -> None:
    """Raise OutboxPathError unless ``path`` is absent, empty, or an outbox database."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutboxPathError(f"cannot be inspected: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OutboxPathError("exists and is not a regular file; not touching it")
    if st.st_size == 0:
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(100)
    except OSError as exc:
        raise OutboxPathError(f"cannot be read: {exc.strerror or exc}") from None
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        raise OutboxPathError("exists and is not an SQLite database (not an outbox); not "
                              "touching it: move it away or choose another outbox.path")
    app_id = int.from_bytes(head[_APP_ID_OFFSET:_APP_ID_OFFSET + 4], "big", signed=True)
    if app_id == OUTBOX_APP_ID or (app_id == 0 and _legacy_outbox(path)):
        return
    raise OutboxPathError(f"is an SQLite database of another application (application_id "
                          f"{app_id:#x}), not an outbox; not touching it")


def _db_id(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
    return None if row is None else str(row[0])


def foreign_wal(path: Path) -> str | None:
    """Why the ``-wal`` beside ``path`` is not this database's, or None (none, or ours)."""
    wal = Path(f"{path}-wal")
    if not path.exists() or not wal.exists() or wal.stat().st_size == 0:
        return None
    try:
        main = _ro(path, immutable=True)
        try:
            own = _db_id(main)
        finally:
            main.close()
    except sqlite3.Error:
        return None  # the main file itself is damaged: the corruption path deals with it
    if own is None:
        return None  # created before its identity was checkpointed: nothing to compare
    try:
        merged = _ro(path)
        try:
            seen = _db_id(merged)
        finally:
            merged.close()
    except sqlite3.Error as exc:
        return f"the database cannot be read through it ({exc})"
    if seen != own:
        return f"it carries database {seen or 'none'}, the file is database {own}"
    return None


def keep_foreign_wal(path: Path, stamp: str) -> bool:
    """Move a WAL beside ``path`` that is not its database's aside (logged); True if moved."""
    if not Path(f"{path}-wal").exists():
        return False
    reason = foreign_wal(path) if path.exists() else "there is no database beside it"
    if reason is None:
        return False
    moved = move_aside(path, aside_name(path, "foreign", stamp), ("-wal", "-shm"))
    log.error("%s: the WAL beside it is not this outbox's (%s): kept aside as %s; the outbox "
              "goes on from its own database", path, reason, ", ".join(str(p) for p in moved))
    return True


@dataclass
class Salvage:
    copied: int = 0
    unreadable: int = 0
    quarantine_copied: int = 0
    last_seq: int = 0


def _rows_after(src: sqlite3.Connection, table: str, after: int) -> list[tuple[object, ...]]:
    cols = "seq, kind, topic, payload, created_ns, attempts"
    if table == "quarantine":
        cols += ", quarantined_ns, reason"
    return src.execute(f"SELECT {cols} FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?",
                       (after, SALVAGE_CHUNK)).fetchall()


def _one(src: sqlite3.Connection, table: str, seq: int) -> tuple[object, ...] | None:
    cols = "seq, kind, topic, payload, created_ns, attempts"
    if table == "quarantine":
        cols += ", quarantined_ns, reason"
    try:
        row: tuple[object, ...] | None = src.execute(
            f"SELECT {cols} FROM {table} WHERE seq = ?", (seq,)).fetchone()
    except sqlite3.DatabaseError:
        return None
    return row


def _known_seqs(src: sqlite3.Connection, table: str) -> set[int]:
    """Seqs listed by the table's index (a b-tree of its own, often intact)."""
    out: set[int] = set()
    if table != "outbox":
        return out
    with contextlib.suppress(sqlite3.DatabaseError):
        for (seq,) in src.execute("SELECT seq FROM outbox INDEXED BY outbox_kind_seq"):
            out.add(int(seq))
    return out


def _read_table(src: sqlite3.Connection, table: str) -> tuple[list[tuple[object, ...]], int]:
    """Every readable row of ``table`` and the number of rows known but unreadable."""
    known = _known_seqs(src, table)
    rows: dict[int, tuple[object, ...]] = {}
    after = -(2**63)
    while True:
        try:
            batch = _rows_after(src, table, after)
        except sqlite3.DatabaseError:
            # A damaged stretch: step over it one known seq at a time.
            ahead = sorted(s for s in known if s > after)
            for seq in ahead:
                after = seq
                row = _one(src, table, seq)
                if row is not None:
                    rows[seq] = row
                    break
            else:
                break
            continue
        if not batch:
            break
        for row in batch:
            rows[int(row[0])] = row  # type: ignore[call-overload]
        after = int(batch[-1][0])  # type: ignore[call-overload]
    unreadable = len(known - rows.keys())
    return [rows[s] for s in sorted(rows)], unreadable


def salvage(src_path: Path, dst: sqlite3.Connection) -> Salvage:
    """Copy every readable row of the damaged outbox at ``src_path`` into ``dst``."""
    out = Salvage()
    try:
        src = _ro(src_path)
    except sqlite3.Error as exc:
        log.error("%s: nothing can be salvaged: %s", src_path, exc)
        return out
    try:
        for table in ("outbox", "quarantine"):
            try:
                rows, unreadable = _read_table(src, table)
            except sqlite3.DatabaseError as exc:  # not even the schema can be read
                log.error("%s: table %s cannot be read: %s", src_path, table, exc)
                continue
            marks = ", ".join("?" * len(rows[0])) if rows else ""
            dst.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    dst.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", rows)
                dst.execute("COMMIT")
            except BaseException:
                dst.execute("ROLLBACK")
                raise
            if table == "outbox":
                out.copied, out.unreadable = len(rows), unreadable
            else:
                out.quarantine_copied = len(rows)
                out.unreadable += unreadable
            if rows:
                out.last_seq = max(out.last_seq, int(rows[-1][0]))  # type: ignore[call-overload]
    finally:
        src.close()
    return out


def aside_name(path: Path, label: str, stamp: str) -> Path:
    """A name beside ``path`` that no earlier moved-aside file has."""
    base = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while any(Path(f"{base}{s}").exists() for s in SUFFIXES):
        n += 1
        base = path.with_name(f"{path.name}.{label}-{stamp}.{n}")
    return base


def move_aside(path: Path, target: Path, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """Rename ``path`` + each suffix to ``target`` + suffix; the files moved."""
    moved = []
    for suffix in suffixes:
        src = Path(f"{path}{suffix}")
        if src.exists():
            dst = Path(f"{target}{suffix}")
            os.replace(src, dst)
            moved.append(dst)
    return moved


def prune_aside(path: Path, keep: int, max_bytes: int) -> None:
    """Delete the oldest moved-aside sets beyond ``keep`` sets or ``max_bytes`` in all, each
    with a log line; the newest set is always kept."""
    sets: dict[str, list[Path]] = {}
    for label in ASIDE_LABELS:
        for p in path.parent.glob(f"{path.name}.{label}-*"):
            stem = p.name.removesuffix("-wal").removesuffix("-shm")
            sets.setdefault(stem, []).append(p)

    def mtime(stem: str) -> float:
        return max((p.stat().st_mtime for p in sets[stem] if p.exists()), default=0.0)

    order = sorted(sets, key=lambda s: (mtime(s), s), reverse=True)  # newest first
    total = 0
    for i, stem in enumerate(order):
        size = sum(p.stat().st_size for p in sets[stem] if p.exists())
        total += size
        if i == 0 or (i < keep and total <= max_bytes):
            continue
        for p in sets[stem]:
            p.unlink(missing_ok=True)
        log.warning("%s: deleted the moved-aside file %s (%d bytes) to stay within %d files "
                    "and %d bytes of them", path, path.with_name(stem), size, keep, max_bytes)
