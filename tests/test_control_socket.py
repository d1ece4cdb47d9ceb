"""The control socket's file: its mode, a stale or live socket at the path, a path too long,
the group, and closing connections on stop."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat

import pytest

from agent.control.server import ControlServer
from agent.control.wire import ControlSocketError
from tests.test_control import Conn, FakeAgent, _tail, connect, serving, short_dir
from tests.waiting import until


async def test_socket_mode_and_removal_on_cancel() -> None:
    with short_dir() as d:
        path = d / "new" / "control.sock"
        async with serving(FakeAgent(), path, group=None):
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
        assert not path.exists(), "the socket must be removed when the server stops"


async def test_only_the_sockets_own_directory_is_created() -> None:
    with short_dir() as d:
        path = d / "typo" / "run" / "control.sock"
        server = ControlServer(path, FakeAgent(), group=None)
        with pytest.raises(ControlSocketError, match="not a directory"):
            await asyncio.wait_for(server.serve(), 5.0)
        assert list(d.iterdir()) == [], "no directory tree may be created"


async def test_stale_socket_of_a_killed_agent_is_replaced() -> None:
    with short_dir() as d:
        path = d / "control.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(path))  # bound, never listening, then gone: what kill -9 leaves
        dead.close()
        assert path.exists()
        async with serving(FakeAgent(), path, group=None), connect(path) as c:
            assert (await c.ask({"id": 1, "cmd": "status"}))["ok"]


async def test_a_live_agent_socket_is_not_stolen() -> None:
    with short_dir() as d:
        path = d / "control.sock"
        async with serving(FakeAgent(), path, group=None):
            second = ControlServer(path, FakeAgent(), group=None)
            with pytest.raises(ControlSocketError, match="already listening"):
                await asyncio.wait_for(second.serve(), 5.0)
            async with connect(path) as c:
                assert (await c.ask({"id": 1, "cmd": "status"}))["ok"]


async def test_a_regular_file_at_the_socket_path_is_left_alone() -> None:
    with short_dir() as d:
        path = d / "control.sock"
        path.write_text("precious")
        with pytest.raises(ControlSocketError, match="not a socket"):
            await asyncio.wait_for(ControlServer(path, FakeAgent(), group=None).serve(), 5.0)
        assert path.read_text() == "precious"


async def test_a_path_too_long_for_a_unix_socket_is_a_clear_error() -> None:
    with short_dir() as d:
        path = d / ("x" * 120) / "control.sock"
        with pytest.raises(ControlSocketError, match="longer than 107 bytes"):
            await asyncio.wait_for(ControlServer(path, FakeAgent(), group=None).serve(), 5.0)


async def test_stopping_the_server_closes_open_connections() -> None:
    with short_dir() as d:
        path = d / "control.sock"
        agent = FakeAgent()
        async with serving(agent, path, group=None):
            reader, writer = await asyncio.open_unix_connection(str(path))
            c = Conn(reader, writer)
            await _tail(c)
            await until(lambda: agent.pipeline.tail.active, 5.0, "tail subscription")
        try:
            assert await c.recv() is None, "a streaming client must see the end of the stream"
        finally:
            await c.close()
        assert not agent.pipeline.tail.active
        assert not path.exists()


async def test_socket_group_is_applied_when_the_group_exists() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to a group we are not in needs root")

    other = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    assert other is not None, "no group other than our own on this machine"
    with short_dir() as d:
        path = d / "control.sock"
        async with serving(FakeAgent(), path, group=other.gr_name):
            st = path.stat()
    assert st.st_gid == other.gr_gid
    assert stat.S_IMODE(st.st_mode) == 0o660
