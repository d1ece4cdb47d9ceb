"""Bounded waiting for tests: poll a condition with a deadline; run a sensor for a block."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from agent.readings import Reading
from drivers.base import DriverError, Sensor


async def until(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    """Poll ``cond`` until true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or cond}")
        await asyncio.sleep(0.005)


def until_sync(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    """``until`` for a thread that is not the event loop's (a subprocess, an agent elsewhere)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or cond}")
        time.sleep(0.005)


@contextlib.asynccontextmanager
async def running(s: Sensor, out: list[Reading]) -> AsyncIterator[asyncio.Task[Any]]:
    """``s.run`` collecting into ``out`` for the block; stopped (its driver error ignored)
    at the end."""
    task = asyncio.create_task(s.run(out.append), name=f"run:{s.name}")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DriverError):
            await task
