"""What the outbox holds: message classes, rows, the batches handed to the worker, the drop policy.

Plain data, no I/O: shared by the SQLite layer (``agent.outbox.db``) and the ``Outbox`` in
``agent.outbox.store``, which sheds its in-memory buffer by the same policy the database does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

Kind = Literal["raw", "window", "inference", "health", "anomaly"]
KINDS: Final[tuple[Kind, ...]] = ("window", "inference", "health", "raw", "anomaly")
# Under pressure rows go in this order, oldest first within a class: raw readings are the
# bulk and the least valuable per byte; old health snapshots are superseded by newer ones;
# inference can be recomputed from windows; windows are the record; anomaly events are few
# and name a fault someone must fix, so they go last.
DROP_ORDER: Final[tuple[Kind, ...]] = ("raw", "health", "inference", "window", "anomaly")
ROW_OVERHEAD_BYTES: Final = 64  # rough per-row cost of key, columns and b-tree cells


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    kind: Kind
    topic: str
    payload: bytes
    created_ns: int
    attempts: int = 0

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic) + ROW_OVERHEAD_BYTES


@dataclass
class Batch:
    """One transaction's worth of changes, handed from the event loop to the worker."""

    rows: list[Row] = field(default_factory=list)
    acks: list[Row] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)
    quarantine: list[tuple[Row, str]] = field(default_factory=list)
    protect: frozenset[int] = frozenset()  # in flight: never dropped under pressure
    top: int = 0  # the highest seq sealed so far, written or not (its row may be acked already)

    def __len__(self) -> int:
        return len(self.rows) + len(self.acks) + len(self.attempts) + len(self.quarantine)


@dataclass
class Snapshot:
    """The state the event loop mirrors after every call into the worker."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    oldest_created_ns: int | None = None
    last_seq: int = 0
    corrupt_resets: int = 0
    salvaged: int = 0  # rows copied out of damaged files into the new one
    unreadable: int = 0  # rows a damaged file listed but that could not be read
    quarantined: int = 0
    reserved: int = 0  # the fsynced seq reservation: publish-through stays below it
    version: int = 0  # +1 per call that changed it; the loop keeps the newest copy


@dataclass(frozen=True, slots=True)
class Dropped:
    kind: Kind
    reason: Literal["rows", "bytes", "age"]
    count: int


def choose_victims(rows: Sequence[Row], n: int) -> list[int]:
    """Indexes of ``n`` rows to drop from an in-memory buffer, by DROP_ORDER, oldest first."""
    out: list[int] = []
    for kind in DROP_ORDER:
        for i, r in enumerate(rows):
            if len(out) >= n:
                return out
            if r.kind == kind:
                out.append(i)
    return out
