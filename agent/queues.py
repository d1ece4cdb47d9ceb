"""Bounded queues between pipeline stages, each with a named drop policy and counters.

Producers never block: acquisition must not stall behind a slow consumer. When a queue is full
its policy decides what is lost, and every loss is counted so health can show it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, Literal, TypeVar

from agent.aio import within

T = TypeVar("T")
DropPolicy = Literal["drop_oldest", "drop_newest"]


class BoundedQueue(Generic[T]):
    def __init__(self, name: str, maxsize: int, policy: DropPolicy = "drop_oldest") -> None:
        if maxsize < 1:
            raise ValueError(f"queue {name}: maxsize must be >= 1, got {maxsize}")
        self.name = name
        self.maxsize = maxsize
        self.policy: DropPolicy = policy
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()
        self.put_count = 0
        self.dropped = 0
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> bool:
        """Enqueue without blocking. Returns False when ``item`` itself was dropped."""
        self.put_count += 1
        if len(self._items) >= self.maxsize:
            self.dropped += 1
            if self.policy == "drop_newest":
                return False
            self._items.popleft()
        self._items.append(item)
        self.high_water = max(self.high_water, len(self._items))
        self._ready.set()
        return True

    async def get_batch(self, limit: int, timeout_s: float | None = None) -> list[T]:
        """Wait for at least one item (or the timeout) and take up to ``limit`` items."""
        if not self._items:
            self._ready.clear()
            if timeout_s is None:
                await self._ready.wait()
            else:
                try:
                    await within(self._ready.wait(), timeout_s)
                except TimeoutError:
                    return []
        n = min(limit, len(self._items))
        return [self._items.popleft() for _ in range(n)]

    def drain(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        return items

    def stats(self) -> dict[str, int | str]:
        return {
            "depth": len(self._items),
            "maxsize": self.maxsize,
            "policy": self.policy,
            "put": self.put_count,
            "dropped": self.dropped,
            "high_water": self.high_water,
        }
