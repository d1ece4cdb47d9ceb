"""The live lane's queue (rows the outbox handed over, waiting for room in the in-flight window)
and the record of a message in flight.

Bounded by rows and bytes; a row that overflows it, or waits longer than ``LIVE_LAG_S`` (the
link is slower than production), is demoted: the publisher reads it back later as backlog.
Each demoting call returns the highest seq it demoted (0 for none), which the publisher adds
to the backlog's range.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Sequence
from typing import Final

from agent.outbox.rows import Row

LIVE_MAX_ROWS: Final = 10_000
LIVE_MAX_BYTES: Final = 8 * 1024 * 1024
LIVE_LAG_S: Final = 5.0


@dataclasses.dataclass(slots=True)
class Flight:
    row: Row
    lane: str  # "live" or "backlog"
    sent_s: float  # time.monotonic() at the send
    fut: asyncio.Future[int]  # the PUBACK's reason code


class LiveQueue:
    def __init__(self, max_rows: int = LIVE_MAX_ROWS, max_bytes: int = LIVE_MAX_BYTES,
                 lag_s: float = LIVE_LAG_S) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.lag_ns = int(lag_s * 1e9)
        self._rows: collections.deque[Row] = collections.deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._rows)

    def push(self, rows: Sequence[Row]) -> int:
        for r in rows:
            self._rows.append(r)
            self._bytes += r.size
        top = 0
        while len(self._rows) > self.max_rows or self._bytes > self.max_bytes:
            top = self._demote()
        return top

    def pop(self) -> Row:
        r = self._rows.popleft()
        self._bytes -= r.size
        return r

    def demote_stale(self, now_ns: int) -> int:
        top = 0
        while self._rows and self._rows[0].created_ns < now_ns - self.lag_ns:
            top = self._demote()
        return top

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0

    def _demote(self) -> int:
        return self.pop().seq
