"""Anomaly events and the latch that turns per-window conditions into one event per fault.

An event opens once a condition has held for ``n_on`` consecutive windows and stays open, with
one identity, until the condition has been false for ``n_off`` consecutive windows. Windows in
which a detector cannot judge (missing data, a lamp switching) neither confirm nor clear it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final, Literal

EventType = Literal[
    "meter_stuck", "meter_spike", "meter_drift", "lamps_dark", "lamps_lit", "unexplained_load",
]
EVENT_TYPES: Final[tuple[EventType, ...]] = (
    "meter_stuck", "meter_spike", "meter_drift", "lamps_dark", "lamps_lit", "unexplained_load",
)
Severity = Literal["info", "warning", "critical"]
Evidence = dict[str, float | str]

SCHEMA: Final = "edge-agent/anomaly/1"
NS: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    """One fault episode. ``end_ns`` is None while the fault is still present.

    ``start_ns`` is when the evidence says the fault began (the first window of the run that
    confirmed it); ``detected_ns`` is the end of the window in which it was confirmed, i.e.
    when the gateway could first have told anyone.
    """

    type: EventType
    stream: str
    channel: str  # the meter or circuit it concerns, e.g. "main" or "lights"
    start_ns: int
    detected_ns: int
    severity: Severity
    evidence: Evidence = field(default_factory=dict)
    end_ns: int | None = None

    @property
    def event_id(self) -> str:
        """Stable across the open and the close message of the same episode."""
        return f"{self.type}:{self.channel}:{self.start_ns // NS}"

    @property
    def open(self) -> bool:
        return self.end_ns is None

    def closed(self, end_ns: int) -> AnomalyEvent:
        return replace(self, end_ns=end_ns)

    def to_message(self) -> dict[str, object]:
        """Body of the ``anomaly/{stream}`` message (the feed adds its envelope)."""
        return {
            "schema": SCHEMA,
            "event_id": self.event_id,
            "type": self.type,
            "stream": self.stream,
            "channel": self.channel,
            "start": _iso(self.start_ns),
            "detected": _iso(self.detected_ns),
            "end": None if self.end_ns is None else _iso(self.end_ns),
            "severity": self.severity,
            "evidence": dict(self.evidence),
        }


def topic(prefix: str, gateway: str, stream: str) -> str:
    return f"{prefix}/{gateway}/anomaly/{stream}"


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS, tz=UTC).isoformat().replace("+00:00", "Z")


class Latch:
    """Hysteresis over windows: open after ``n_on`` true in a row, close after ``n_off`` false.

    ``update`` returns "open" or "close" on a transition, else None. ``first_true_ns`` keeps the
    start of the run that opened it, so an event can be dated from the first faulty window.
    """

    __slots__ = ("_off", "_on", "first_true_ns", "is_open", "last_true_end_ns", "n_off", "n_on")

    def __init__(self, n_on: int, n_off: int) -> None:
        self.n_on = max(1, n_on)
        self.n_off = max(1, n_off)
        self.is_open = False
        self._on = 0
        self._off = 0
        self.first_true_ns = 0
        self.last_true_end_ns = 0

    def update(self, cond: bool | None, start_ns: int, end_ns: int) -> str | None:
        if cond is None:  # cannot judge this window
            return None
        if cond:
            if self._on == 0 and not self.is_open:
                self.first_true_ns = start_ns
            self._on += 1
            self._off = 0
            self.last_true_end_ns = end_ns
            if not self.is_open and self._on >= self.n_on:
                self.is_open = True
                return "open"
            return None
        self._off += 1
        if not self.is_open:
            self._on = 0
            return None
        if self._off >= self.n_off:
            self.is_open = False
            self._on = 0
            return "close"
        return None

    def reset(self) -> None:
        self.is_open = False
        self._on = 0
        self._off = 0
