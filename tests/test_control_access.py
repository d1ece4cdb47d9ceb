"""Who may talk to the agent: the socket's mode and group, checked with real other users."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_control import FakeAgent, serving, short_dir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("useradd") is None,
    reason="needs root, setpriv and useradd to connect as other users")

# Runs as the other user: only the standard library, nothing from this checkout.
CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied")
    sys.exit(13)
s.sendall(b'{"id": 1, "cmd": "status"}\n')
reply = json.loads(s.makefile("rb").readline())
print("status ok" if reply.get("ok") else "status refused")
sys.exit(0 if reply.get("ok") else 1)
"""


def _sh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)


def python_for_everyone() -> str:
    """An interpreter an unprivileged user can start (a venv under /root is not one)."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and _sh(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              candidate, "-I", "-c", "pass"]).returncode == 0:
            return candidate
    pytest.skip("no Python interpreter that an unprivileged user may run")


@contextlib.contextmanager
def technician_account() -> Iterator[tuple[str, str]]:
    """A throwaway group (the socket's) and a user in it by supplementary membership."""
    tag = secrets.token_hex(3)
    group, user = f"ea-ctl-{tag}", f"ea-tech-{tag}"
    made = _sh(["groupadd", "--system", group])
    if made.returncode != 0:
        pytest.skip(f"groupadd does not work here: {made.stderr.strip()}")
    try:
        made = _sh(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", "--groups", group, user])
        if made.returncode != 0:
            pytest.skip(f"useradd does not work here: {made.stderr.strip()}")
        try:
            yield user, group
        finally:
            _sh(["userdel", user])
    finally:
        _sh(["groupdel", group])


async def connect_as(python: str, ids: list[str], path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "setpriv", *ids, python, "-I", "-c", CLIENT, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
        env={"PATH": "/usr/bin:/bin"})
    out, err = await asyncio.wait_for(proc.communicate(), 30.0)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode().strip()


async def test_only_root_and_the_socket_group_may_connect() -> None:
    python = python_for_everyone()
    with technician_account() as (user, group), short_dir() as d:
        d.chmod(0o755)  # the directory is not what is being tested: the socket's mode is
        path = d / "control.sock"
        async with serving(FakeAgent(), path, group=group):
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert (st.st_uid, st.st_gid) == (0, grp.getgrnam(group).gr_gid)

            outsider = await connect_as(python, ["--reuid=65534", "--regid=65534",
                                                 "--clear-groups"], path)
            assert outsider == (13, "denied"), outsider

            tech = pwd.getpwnam(user)
            assert tech.pw_gid != grp.getgrnam(group).gr_gid, "membership must be supplementary"
            member = await connect_as(python, [f"--reuid={user}", f"--regid={tech.pw_gid}",
                                               "--init-groups"], path)
            assert member == (0, "status ok"), member
