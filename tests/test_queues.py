from __future__ import annotations

import asyncio

import pytest

from agent.queues import BoundedQueue


def test_drop_oldest_counts_and_keeps_newest() -> None:
    q: BoundedQueue[int] = BoundedQueue("q", 3, "drop_oldest")
    for i in range(5):
        q.put(i)
    assert q.drain() == [2, 3, 4]
    assert q.stats()["dropped"] == 2


def test_drop_newest_rejects_incoming() -> None:
    q: BoundedQueue[int] = BoundedQueue("q", 2, "drop_newest")
    assert q.put(1) and q.put(2)
    assert not q.put(3)
    assert q.drain() == [1, 2]
    assert q.dropped == 1


async def test_get_batch_wakes_on_put_and_times_out() -> None:
    q: BoundedQueue[int] = BoundedQueue("q", 10)
    assert await q.get_batch(5, timeout_s=0.01) == []
    waiter = asyncio.create_task(q.get_batch(5))
    await asyncio.sleep(0)
    q.put(7)
    assert await asyncio.wait_for(waiter, 1.0) == [7]


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="queue q"):
        BoundedQueue("q", 0)
