"""Small asyncio helpers shared by the agent and the drivers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``await aw`` with a timeout (TimeoutError), in the calling task.

    Used instead of ``asyncio.wait_for``: on Python 3.11 ``wait_for`` can swallow a cancellation
    that arrives as the awaited operation completes, so a stopping task would run on.
    """
    async with asyncio.timeout(timeout_s):
        return await aw
