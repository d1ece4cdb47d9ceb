"""Per-site detector thresholds: what calibration produces and what the manifest or config holds.

Every field is a plain number or a list of numbers, so ``to_json``/``from_json`` round-trip
exactly; ``from_json`` rejects unknown or missing keys, so a hand-edited file cannot silently
fall back to a default.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

VERSION: Final = 2
# Version 1 had no ``lamps.dawn_margin_deg``; such a file keeps its old behaviour (no
# same-night dawn bound) rather than being refused.
NO_DAWN_BOUND: Final = 90.0


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
    # After the photocell switched on at elevation e at dusk, lights must be off at the
    # following dawn once the sun is above e + this (NO_DAWN_BOUND: not used).
    dawn_margin_deg: float
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
        version = raw.pop("version", None)
        if version == 1 and isinstance(raw.get("lamps"), dict):
            raw["lamps"].setdefault("dawn_margin_deg", NO_DAWN_BOUND)
        elif version != VERSION:
            raise ValueError(f"anomaly thresholds: expected version {VERSION} (or 1)")
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


SHIPPED: Final = Path(__file__).with_name("training_site.json")
MAX_FILE_BYTES: Final = 1 << 20


class ThresholdsError(ValueError):
    """A thresholds file that cannot be used; the message says why."""


def _finite_numbers(value: Any, where: str) -> None:
    if isinstance(value, bool) or value is None:
        raise ThresholdsError(f"{where}: {value!r} is not a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ThresholdsError(f"{where}: {value!r} is not a finite number")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _finite_numbers(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_numbers(v, f"{where}.{k}" if where else str(k))
        return
    raise ThresholdsError(f"{where}: {type(value).__name__} is not a number")


def load_thresholds(path: str | Path = "") -> Thresholds:
    """Thresholds from a JSON file (empty path: the shipped ones of the training site).

    The file is hostile until parsed: size-capped, UTF-8, JSON without NaN or Infinity, every
    leaf a finite number, and exactly the keys of this version."""
    source = Path(path) if path else SHIPPED
    try:
        with source.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ThresholdsError(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ThresholdsError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ThresholdsError("not UTF-8") from None
    except RecursionError:
        raise ThresholdsError("nested too deeply") from None
    except ValueError as exc:
        raise ThresholdsError(f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ThresholdsError("not a JSON object")
    _finite_numbers(raw, "")
    try:
        return Thresholds.from_json(json.dumps(raw))
    except (TypeError, ValueError) as exc:
        raise ThresholdsError(str(exc)) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
