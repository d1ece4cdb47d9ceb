"""The two small files beside the outbox that keep a seq from ever naming two messages.

* ``<path>.seq``, the reservation: a seq not yet used, rewritten with fsync (write, fsync,
  rename, fsync the directory) before any seq at or beyond it is committed or published. It
  survives a power cut, the database being moved aside or restored from elsewhere.
* ``<path>.sent``, the sent marker: the highest seq handed to the publisher before its commit
  (publish-through). If the process dies before that commit, the message may have reached the
  cloud though its row never reached the disk, so its seq must not be given to another message
  after a restart. It is rewritten in place, one ``pwrite`` of a fixed-size record into the page
  cache, before the messages go out: a ``kill -9`` cannot undo that. A power cut can, but after
  a reboot the reservation is used instead, and publish-through only hands out seqs below it.

Both are input from disk: a file that does not parse is reported and not trusted (the caller
falls back to the reservation, or to the wall clock), never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

_SENT_RECORD_BYTES: Final = 128
_SENT_MAX_READ: Final = 4096
_SENT_RE: Final = re.compile(rb"edge-agent-sent 1 (\S{1,64}) (\d{1,20})\n *")
_SIDE_MAX_READ: Final = 4096


def _read_regular(path: Path, limit: int) -> bytes:
    """The first ``limit`` bytes of a regular file; never blocks on a FIFO or a device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_reservation(path: Path) -> tuple[str, int] | None:
    """(db_id, reserved) from ``path``; None when absent or unreadable (logged)."""
    try:
        data = json.loads(_read_regular(path, _SIDE_MAX_READ))
        reserved = data["reserved"]
        if not isinstance(reserved, int) or isinstance(reserved, bool) or not (
                0 <= reserved < 2**63):
            raise ValueError(f"reserved is {str(reserved)[:40]!r}, not a seq")
        return str(data["db_id"]), reserved
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("%s: unreadable (%s); using the database's own sequence", path, exc)
        return None


def write_reservation(path: Path, db_id: str, reserved: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"db_id": db_id, "reserved": reserved}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class SentMarker:
    """``<path>.sent``. ``open``/``read``/``close`` run on the outbox's worker thread, ``write``
    on the event loop (a page-cache write, no fsync); a lock keeps them apart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value = 0  # the highest seq recorded so far
        self._fd: int | None = None
        self._db_id = ""
        self._lock = threading.Lock()

    @property
    def usable(self) -> bool:
        return self._fd is not None

    def read(self, db_id: str) -> int | None:
        """The highest seq recorded for ``db_id``: 0 without a file, None when the file does
        not parse or names another database (logged)."""
        try:
            data = _read_regular(self.path, _SENT_MAX_READ)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.error("%s: unreadable (%s); not trusted", self.path, exc)
            return None
        m = _SENT_RE.fullmatch(data)
        if m is None:
            log.error("%s: not a sent marker (%d bytes); not trusted", self.path, len(data))
            return None
        if m.group(1).decode("ascii", "replace") != db_id:
            log.error("%s: belongs to another outbox; not trusted", self.path)
            return None
        return int(m.group(2))

    def open(self, db_id: str, seq: int) -> None:
        """Start over for ``db_id`` at ``seq`` (every seq up to it is accounted for). On an
        error the marker is unusable and publish-through holds every message for its commit."""
        with self._lock:
            self._close()
            self._db_id = db_id if re.fullmatch(r"\S{1,64}", db_id) else "unnamed"
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                log.error("%s: cannot open (%s): messages wait for their commit before they "
                          "are published", self.path, exc)
                return
            self._fd = fd
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError("not a regular file")
                self._put(seq)
                os.ftruncate(fd, _SENT_RECORD_BYTES)
            except OSError as exc:
                log.error("%s: cannot write (%s): messages wait for their commit before they "
                          "are published", self.path, exc)
                self._close()

    def write(self, seq: int) -> None:
        """Record ``seq`` before messages up to it are published; OSError when it cannot."""
        with self._lock:
            if self._fd is None:
                raise OSError(f"{self.path} is not open")
            if seq > self.value:
                self._put(seq)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _put(self, seq: int) -> None:
        assert self._fd is not None
        record = f"edge-agent-sent 1 {self._db_id} {seq}\n".encode().ljust(_SENT_RECORD_BYTES)
        # One write of one record inside one page: the page cache holds all of it or none.
        if os.pwrite(self._fd, record, 0) != len(record):
            raise OSError(f"{self.path}: short write")
        self.value = seq

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                log.debug("%s: close: %s", self.path, exc)
