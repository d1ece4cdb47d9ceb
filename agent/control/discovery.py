"""Finding a running agent whose control socket nobody named: the demo.

The installed agent listens on the default socket. ``edge-agent demo`` runs its agent with a
socket in a temporary directory, and writes where that is into a small file in the user's
runtime directory (``$XDG_RUNTIME_DIR``, else the temp directory), named by user id. The socket
commands read that file when the default socket is absent. The file is believed only when it is
this user's own regular file, small, valid, names a process that is alive and a socket that
exists; anything else is as if there were no demo.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent import jsontext

MAX_POINTER_BYTES = 4096


@dataclass(frozen=True)
class Found:
    socket: str
    pid: int


def pointer_path() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    where = Path(base) if base and os.path.isdir(base) else Path(tempfile.gettempdir())
    return where / f"edge-agent-demo-{os.getuid()}.json"


def announce(socket: str, pid: int | None = None) -> Path:
    """Record that the demo (this process) serves ``socket``; returns the file written."""
    path = pointer_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(jsontext.dumps({"socket": socket, "pid": pid or os.getpid()}))
    os.replace(tmp, path)
    return path


def withdraw(pid: int | None = None) -> None:
    """Remove the record if it is still this process's (a newer demo may have replaced it)."""
    found = _read(pointer_path())
    if found is not None and found.pid == (pid or os.getpid()):
        with contextlib.suppress(OSError):
            pointer_path().unlink()


def find_demo() -> Found | None:
    """The running demo's socket, or None."""
    found = _read(pointer_path())
    if found is None or not _alive(found.pid):
        return None
    try:
        if not stat.S_ISSOCK(os.stat(found.socket).st_mode):
            return None
    except OSError:
        return None
    return found


def _read(path: Path) -> Found | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                or st.st_size > MAX_POINTER_BYTES):
            return None
        raw = os.read(fd, MAX_POINTER_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        doc = jsontext.parse(raw, max_bytes=MAX_POINTER_BYTES, max_depth=2)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    sock, pid = doc.get("socket"), doc.get("pid")
    if not isinstance(sock, str) or not sock or isinstance(pid, bool) or not isinstance(pid, int):
        return None
    if not 0 < pid < 2**22:  # the kernel's pid_max ceiling
        return None
    return Found(sock, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the id was reused, our demo has gone
    return True
