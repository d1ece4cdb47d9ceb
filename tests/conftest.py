"""Fixtures every test module may use: a real mosquitto broker and pty pairs."""

from __future__ import annotations

import contextlib
import os
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.clock import SystemClock
from drivers.base import BuildContext
from tests.broker import Mosquitto


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the session. Tests that stop it must restart it before they end."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def broker(mosquitto: Mosquitto) -> Iterator[Mosquitto]:
    """The session broker, guaranteed running at the start and end of the test."""
    mosquitto.start()
    yield mosquitto
    mosquitto.start()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own, for tests that kill it or change its config."""
    b = Mosquitto(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


@pytest.fixture
async def ctx() -> AsyncIterator[BuildContext]:
    """A driver build context on the system clock; what drivers put on its stack is closed."""
    async with contextlib.AsyncExitStack() as stack:
        yield BuildContext(SystemClock(), stack)


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    """(master fd, slave path) of a raw pty: the device side holds the master."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    yield master, path
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
async def agent_sock() -> AsyncIterator[tuple[Any, Path]]:
    """A control server on a short socket path, serving a fake agent (CLI tests)."""
    from tests.test_control import FakeAgent, serving, short_dir

    agent = FakeAgent()
    with short_dir() as d:
        path = d / "control.sock"
        async with serving(agent, path, group=None, export_dir=d):
            yield agent, path
