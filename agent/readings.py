"""Data contracts that flow through the pipeline: Reading -> Window -> Inference.

They are plain frozen, slotted dataclasses: a Reading is created for every sample on the hot
path, so it must be cheap to build and carry no validation machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

Quality = Literal["good", "suspect", "bad"]

GOOD: Final = "good"
SUSPECT: Final = "suspect"
BAD: Final = "bad"

# Canonical units; drivers convert to these before building a Reading.
UNITS: Final = frozenset(
    {"degC", "Pa", "%RH", "V", "A", "W", "Wh", "Hz", "m/s", "ug/m3", "count", "1", "s", "veh/h",
     "var", "VA", "varh", "VAh", "deg"}
)


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample of one quantity from one configured sensor."""

    sensor: str
    quantity: str
    value: float
    unit: str
    ts_ns: int  # UTC wall clock at acquisition
    mono_ns: int  # time.monotonic_ns() at acquisition; survives a wall-clock step
    quality: Quality = GOOD
    reasons: tuple[str, ...] = ()

    @property
    def channel(self) -> str:
        """The key that names this series everywhere downstream: ``sensor.quantity``."""
        return f"{self.sensor}.{self.quantity}"


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """Aggregates of one channel over one window, computed over good readings only."""

    count: int
    mean: float
    min: float
    max: float
    last: float
    std: float
    unit: str
    suspect: int = 0
    bad: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """One fixed wall-clock interval [start_ns, end_ns) of one stream."""

    stream: str
    start_ns: int
    end_ns: int
    channels: dict[str, ChannelStats]
    fused: dict[str, ChannelStats] = field(default_factory=dict)
    derived: dict[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # e.g. "clock_unsynced", "restamped"


@dataclass(frozen=True, slots=True)
class Inference:
    """The outputs of one model run on one window."""

    model: str
    version: str  # sha256 prefix of the model file
    window_start_ns: int
    outputs: dict[str, float | str]
    latency_ms: float
    stream: str = ""
    shadow: bool = False
    source: str = "model"  # or "fallback" (persistence) / "blend" (clipped move): skill guard
    skill: float | None = None  # 1 - model MAE / persistence MAE at this site, running
    out_of_range: tuple[str, ...] = ()  # inputs outside the span of the training data
