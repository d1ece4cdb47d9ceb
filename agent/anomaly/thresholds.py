"""Per-site detector thresholds: what calibration produces and what the manifest or config holds.

Every field is a plain number or a list of numbers, so ``to_json``/``from_json`` round-trip
exactly; ``from_json`` rejects unknown or missing keys, so a hand-edited file cannot silently
fall back to a default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class StuckThresholds:
    frozen_windows: int  # identical consecutive means that make a meter "stuck"
    zero_w: float  # a feed meter below this while the other one reads load is "flatlined"
    clear_windows: int


@dataclass(frozen=True, slots=True)
class SpikeThresholds:
    rel: float  # excursion beyond both neighbours, relative to (neighbour level + floor_w)
    floor_w: float
    ref_rel: float  # the other meter must stay below this to call it a meter glitch


@dataclass(frozen=True, slots=True)
class DriftThresholds:
    bias: float  # normal (main - check) / check; meters are never identical
    rel: float  # |running median - bias| that opens a drift event
    clear_rel: float
    span_windows: int  # running-median length
    min_load_w: float  # below this the ratio is noise
    clear_windows: int


@dataclass(frozen=True, slots=True)
class LampThresholds:
    profile_w: list[float]  # lit lighting power by local half hour (dimming schedule included)
    dark_ratio: float  # lit power below this fraction of the profile is "dark"
    lit_w: float  # power above this while lights should be off is "lit by day"
    el_on_deg: float  # the sun below this: lights must be on whatever the photocell says
    el_off_deg: float  # the sun above this: lights must be off
    confirm_windows: int
    clear_windows: int


@dataclass(frozen=True, slots=True)
class UnexplainedThresholds:
    limit_w: list[float]  # residual (feed minus metered circuits) allowed, by local hour
    # Each circuit meter's reading as the feed meter sees it ([lights, charger 1, ...]): no two
    # meters agree exactly, and 0.3 % of 40 kW of charging is already a 120 W "load".
    main_gains: list[float]
    check_gains: list[float]
    # Meter noise grows with the power metered: the limit rises by this many W per W of
    # lighting and charging load in the window.
    load_allowance: float
    confirm_windows: int
    clear_windows: int


@dataclass(frozen=True, slots=True)
class Thresholds:
    stuck: StuckThresholds
    spike: SpikeThresholds
    drift: DriftThresholds
    lamps: LampThresholds
    unexplained: UnexplainedThresholds
    window_s: int
    calibrated_days: float
    target_false_alarms_per_30d: float

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Thresholds:
        raw = json.loads(text)
        if raw.pop("version", None) != VERSION:
            raise ValueError(f"anomaly thresholds: expected version {VERSION}")
        built: Thresholds = _build(cls, raw)
        return built


_NESTED: Final[dict[str, type]] = {
    "stuck": StuckThresholds, "spike": SpikeThresholds, "drift": DriftThresholds,
    "lamps": LampThresholds, "unexplained": UnexplainedThresholds,
}


def _build(cls: type[Any], raw: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    if set(raw) != names:
        extra, missing = sorted(set(raw) - names), sorted(names - set(raw))
        raise ValueError(f"anomaly thresholds {cls.__name__}: extra {extra}, missing {missing}")
    kw = {k: _build(_NESTED[k], v) if cls is Thresholds and k in _NESTED else v
          for k, v in raw.items()}
    return cls(**kw)
