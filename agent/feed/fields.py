"""Field paths of feed messages: the drop and round rules that match them, and the values the
sharing policy reads from a window (its quantity names, its vehicle count). See
``agent.feed.sharing`` for what the rules mean.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from agent.pipeline.derived import RADAR

VEHICLE_QUANTITIES: Final = RADAR  # one reading per vehicle
_ROUND_DIGITS: Final = 9  # removes the float noise of k * step (0.2778 * 50 = 13.890000000000001)


def quantize(value: float, step: float) -> float:
    """``value`` rounded to the nearest multiple of ``step``."""
    ratio = value / step
    if not math.isfinite(ratio):
        return value
    return round(round(ratio) * step, _ROUND_DIGITS)


def quantity_of(channel: str) -> str:
    return channel.rpartition(".")[2]


def output_field(output: str) -> str:
    """The window field a model output stands for: ``speed_next`` -> ``derived.speed_mean``."""
    base = output.removesuffix("_model")
    return "derived." + re.sub(r"_next(?=_|$)", "_mean", base, count=1)


class FieldRules:
    """``drop`` and ``round`` of one namespace, answered per field path and memoised."""

    def __init__(self, drop: Iterable[str], steps: Iterable[tuple[str, float]]) -> None:
        self._drop = [re.compile(fnmatch.translate(p)).match for p in drop]
        self._round = [(re.compile(fnmatch.translate(p)).match, s) for p, s in steps]
        self._dropped: dict[str, bool] = {}
        self._steps: dict[str, float | None] = {}
        self.empty = not self._drop and not self._round

    def dropped(self, path: str) -> bool:
        """True when ``path`` or a path above it is withheld."""
        hit = self._dropped.get(path)
        if hit is None:
            parent, dot, _ = path.rpartition(".")
            hit = (bool(dot) and self.dropped(parent)) or any(m(path) for m in self._drop)
            self._dropped[path] = hit
        return hit

    def step(self, path: str) -> float | None:
        if path in self._steps:
            return self._steps[path]
        step = next((s for m, s in self._round if m(path)), None)
        self._steps[path] = step
        return step


def vehicles_of(fields: Mapping[str, Any]) -> float | None:
    """Vehicles counted by a window: ``derived.vehicles``, else its per-vehicle channels."""
    v = fields.get("derived", {}).get("vehicles")
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    counts = [st["count"] for ch, st in fields.get("channels", {}).items()
              if quantity_of(ch) in VEHICLE_QUANTITIES]
    return float(sum(counts)) if counts else None
