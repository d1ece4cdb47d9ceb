"""Publish-through: when a sealed message is handed to the publisher.

A message is handed over as soon as it is sealed, while its batch is still committing, when a
publish-through listener is registered (the uplink is connected), its seq is below the fsynced
reservation (no reboot can give that seq to another message), no earlier message is held, and
the sent marker (``agent.outbox.seqfiles``) has recorded its seq first. Otherwise it is held
and handed over when its commit is applied, as without publish-through. Every message is
handed over at most once and in seq order; ``released_seq`` is the highest seq handed over or
passed while nobody listened (the publisher's backlog scan reads those once they are committed).

Hand-overs made in one turn of the event loop are batched: one marker write per batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from agent.outbox.rows import Row
from agent.outbox.seqfiles import SentMarker

log = logging.getLogger(__name__)

Listener = Callable[[Sequence[Row]], None]


class Release:
    def __init__(self, marker: SentMarker, next_seq: int) -> None:
        self.marker = marker
        self.listeners: list[Listener] = []
        self.next = next_seq  # the first seq not handed over yet
        self.through = 0  # messages handed over before their commit
        self._held_upto = 0  # the highest seq held for its commit
        self._queue: list[Row] = []
        self._scheduled = False
        self._broken = False  # the marker failed: hold everything until it works again

    @property
    def released_seq(self) -> int:
        return self.next - 1

    def sealed(self, row: Row, reserved: int) -> None:
        if not self.listeners and not self._queue:
            self.next = row.seq + 1  # nobody to hand it to: a later listener reads it back
            return
        if (not self._broken and self.marker.usable
                and row.seq < reserved and self._held_upto < self.next):
            self._queue.append(row)
            if not self._scheduled:
                self._scheduled = True
                try:
                    asyncio.get_running_loop().call_soon(self._flush)
                except RuntimeError:  # no loop (a tool writing into the outbox): at once
                    self._flush()
        else:
            self._held_upto = max(self._held_upto, row.seq)

    def committed(self, rows: Sequence[Row]) -> None:
        """A commit was applied: hand over what was held (every listener is told, even of
        nothing: a publisher waiting for a commit to read its backlog wakes up)."""
        out = [r for r in rows if r.seq >= self.next]
        if out:
            self.next = out[-1].seq + 1
        if self._broken and self.marker.usable:
            try:
                self.marker.write(self.released_seq)
            except OSError:
                pass  # still failing: keep holding
            else:
                self._broken = False
                log.warning("%s works again: messages are published before their commit",
                            self.marker.path)
        self._tell(out)

    def _flush(self) -> None:
        self._scheduled = False
        rows = [r for r in self._queue if r.seq >= self.next]
        self._queue = []
        if not rows:
            return
        if self.listeners:
            try:
                self.marker.write(rows[-1].seq)
            except OSError as exc:
                log.error("%s: %s: messages wait for their commit before they are published",
                          self.marker.path, exc)
                self._broken = True
                self._held_upto = max(self._held_upto, rows[-1].seq)
                return
            self.through += len(rows)
        self.next = rows[-1].seq + 1
        self._tell(rows)

    def _tell(self, rows: Sequence[Row]) -> None:
        for fn in list(self.listeners):
            try:
                fn(rows)
            except Exception:
                log.exception("outbox listener %r failed", fn)
