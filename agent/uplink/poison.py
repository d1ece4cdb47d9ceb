"""Which message keeps the broker from taking it: attempts per message, and quarantine.

Only the broker's refusals count an attempt: an MQTT 5 PUBACK with a reason code >= 0x80, or a
DISCONNECT whose reason code blames a packet right after the message was sent. A drop without
a reason (an outage, a network drop, or an MQTT 3.1.1 broker that closes on a packet it
refuses) counts no attempt; a 3.1.1 poison message is quarantined only after
``SILENT_DROPS_FACTOR`` x ``poison_attempts`` such drops in a row right after it was sent
alone, each with the broker taking a new connection at once. After ``poison_attempts``
attempts a message is quarantined (kept in the outbox's quarantine table, counted, reported),
never retried forever.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Final

from agent.outbox.store import Outbox, Row

log = logging.getLogger(__name__)

SILENT_DROPS_FACTOR: Final = 4


class PoisonLedger:
    def __init__(self, outbox: Outbox, poison_attempts: int, counts: dict[str, int],
                 on_quarantine: Callable[[int], None]) -> None:
        self.outbox = outbox
        self.limit = poison_attempts
        self.counts = counts
        self._on_quarantine = on_quarantine
        self._attempts: dict[int, int] = {}
        self._silent: dict[int, int] = {}  # seq -> drops right after it was sent alone

    def forget(self, seq: int) -> None:
        """The message is acknowledged, or gone."""
        self._attempts.pop(seq, None)
        self._silent.pop(seq, None)

    def attempt(self, row: Row, why: str) -> Row | None:
        """Count one refusal; the row with its attempts, or None when it was quarantined."""
        n = max(self._attempts.get(row.seq, 0), row.attempts) + 1
        self._attempts[row.seq] = n
        row = dataclasses.replace(row, attempts=n)
        self.outbox.set_attempts(row, n)
        if n >= self.limit:
            self.quarantine(row, why)
            return None
        log.warning("uplink: seq %d on %s: %s (attempt %d of %d)", row.seq, row.topic, why, n,
                    self.limit)
        return row

    def blame(self, row: Row, why: str) -> None:
        """The broker closed the connection because of this message."""
        if self.outbox.is_settled(row.seq):
            return
        self.counts["blamed"] += 1
        self.attempt(row, why)

    def silent_drop(self, row: Row) -> None:
        """The connection dropped without a reason right after ``row`` was sent alone, and the
        broker took the next connection at once."""
        if self.outbox.is_settled(row.seq):
            return
        n = self._silent[row.seq] = self._silent.get(row.seq, 0) + 1
        limit = SILENT_DROPS_FACTOR * self.limit
        if n >= limit:
            self.counts["blamed"] += 1
            self.quarantine(row, f"the broker closed the connection right after it was sent, "
                                 f"{n} times in a row, and took the next connection at once")
        else:
            log.info("uplink: seq %d on %s: the connection dropped right after it was sent "
                     "(%d in a row; counted as a refusal only at %d)", row.seq, row.topic, n,
                     limit)

    def quarantine(self, row: Row, why: str) -> None:
        self.counts["quarantined"] += 1
        self.outbox.quarantine(row, why)
        self.forget(row.seq)
        self._on_quarantine(row.seq)
