"""Live copies of readings, windows and inferences for local watchers (`edge-agent tail`).

Costs nothing when nobody watches: the pipeline checks ``active`` before building anything.
Each watcher has its own bounded queue; a slow watcher loses its oldest items, never the
pipeline's.
"""

from __future__ import annotations

from typing import Any

from agent.queues import BoundedQueue

TAIL_QUEUE = 1000


class TailHub:
    def __init__(self) -> None:
        self._subs: dict[int, tuple[str, BoundedQueue[dict[str, Any]]]] = {}
        self._next = 0

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def subscribe(self, match: str = "") -> tuple[int, BoundedQueue[dict[str, Any]]]:
        """``match`` filters on sensor, stream or model name ("" for everything)."""
        self._next += 1
        q: BoundedQueue[dict[str, Any]] = BoundedQueue(f"tail-{self._next}", TAIL_QUEUE)
        self._subs[self._next] = (match, q)
        return self._next, q

    def unsubscribe(self, sub_id: int) -> None:
        self._subs.pop(sub_id, None)

    def publish(self, kind: str, name: str, item: dict[str, Any]) -> None:
        for match, q in self._subs.values():
            if not match or match == name:
                q.put({"kind": kind, "name": name, **item})
