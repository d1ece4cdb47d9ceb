"""Feature vectors for the edge models, built from stream windows.

A model's manifest names its inputs in order; this module computes each name from the windows:

- per-window quantities (the site-data CSV columns, CHANNELS.md ``derived`` names):
  ``flow_veh_h``, ``speed_in_mean``, ``speed_out_mean``, ``speed_mean``, ``occupancy``,
  ``power_mean_w``, and the weather ``temperature``, ``humidity``;
- ``<quantity>_lag<N>``: the quantity N model windows before the current one;
- time at the end of the current window (the start of the window being predicted), in the
  model's time zone: ``hour_sin``/``hour_cos`` (fractional hour), ``dow_sin``/``dow_cos``
  (Monday = 0), ``doy_sin``/``doy_cos`` (day of year).

Models run on windows of ``window_s`` (300 s for the shipped ones). A stream with shorter windows
is rolled up: counts are summed, speeds weighted by vehicles, occupancy and power weighted by the
time covered; a model window completes when a stream window reaches its end.

Missing values: a quantity with no value in a window keeps its last good value for up to
``hold_s[quantity]`` seconds; past that it is missing and the input takes the manifest's ``fill``.
Weather comes from the latest window of any stream that has ``*.temperature`` / ``*.humidity``
channels (or fused groups of those names). History is bounded by the largest lag.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from agent.readings import ChannelStats, Window

TRAFFIC_QUANTITIES = ("flow_veh_h", "speed_in_mean", "speed_out_mean", "speed_mean", "occupancy")
ENERGY_QUANTITIES = ("power_mean_w",)
WEATHER_QUANTITIES = ("temperature", "humidity")
WINDOW_QUANTITIES = TRAFFIC_QUANTITIES + ENERGY_QUANTITIES
TIME_FEATURES = ("hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos")
_LAG = re.compile(r"^(?P<base>[a-z_]+?)_lag(?P<lag>[1-9][0-9]{0,3})$")
_NS = 1_000_000_000


class FeatureError(ValueError):
    """A feature spec or a stream that cannot produce the model's inputs."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    fill: float


@dataclass(frozen=True)
class FeatureSpec:
    inputs: tuple[InputSpec, ...]
    window_s: int
    timezone: str = "UTC"
    hold_s: Mapping[str, float] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)


def parse_input(name: str) -> tuple[str, int]:
    """``speed_mean_lag3`` -> (``speed_mean``, 3); a time feature -> (name, 0)."""
    if name in TIME_FEATURES or name in WINDOW_QUANTITIES or name in WEATHER_QUANTITIES:
        return name, 0
    m = _LAG.match(name)
    if m and m["base"] in WINDOW_QUANTITIES + WEATHER_QUANTITIES:
        return m["base"], int(m["lag"])
    raise FeatureError(f"unknown model input {name!r}")


def time_features(ts_s: float, tz: ZoneInfo) -> dict[str, float]:
    local = datetime.fromtimestamp(ts_s, tz=tz)
    hour = local.hour + local.minute / 60 + local.second / 3600
    dow = local.weekday()
    doy = local.timetuple().tm_yday - 1 + hour / 24
    h, d, y = 2 * math.pi * hour / 24, 2 * math.pi * dow / 7, 2 * math.pi * doy / 365.25
    return {
        "hour_sin": math.sin(h), "hour_cos": math.cos(h),
        "dow_sin": math.sin(d), "dow_cos": math.cos(d),
        "doy_sin": math.sin(y), "doy_cos": math.cos(y),
    }


def _quantity(channel: str) -> str:
    return channel.rsplit(".", 1)[-1]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _stats_by_quantity(w: Window, quantity: str) -> list[ChannelStats]:
    return [s for ch, s in w.channels.items() if _quantity(ch) == quantity and s.count > 0]


def weather_of(w: Window) -> dict[str, float]:
    """Mean of the window's temperature / humidity channels (or fused groups of that name)."""
    out: dict[str, float] = {}
    for q in WEATHER_QUANTITIES:
        fused = w.fused.get(q)
        if fused is not None and fused.count > 0 and math.isfinite(fused.mean):
            out[q] = fused.mean
            continue
        means = [s.mean for s in _stats_by_quantity(w, q) if math.isfinite(s.mean)]
        if means:
            out[q] = sum(means) / len(means)
    return out


@dataclass
class _Rollup:
    """Sums over the stream windows that fall in one model window."""

    start_ns: int
    covered_s: float = 0.0
    traffic_s: float = 0.0
    vehicles: float = 0.0
    speed: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # in, out, all: sum v*n
    weight: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    occ_sum: float = 0.0
    occ_s: float = 0.0
    power_sum: float = 0.0
    power_s: float = 0.0

    def add(self, w: Window) -> None:
        dur = (w.end_ns - w.start_ns) / _NS
        self.covered_s += dur
        d = w.derived
        radar = [_stats_by_quantity(w, "speed_in"), _stats_by_quantity(w, "speed_out")]
        loops = _stats_by_quantity(w, "vehicle_count")
        vehicles = d.get("vehicles", math.nan)
        if not _finite(vehicles):
            if any(radar):
                vehicles = float(sum(s.count for r in radar for s in r))
            elif loops:
                vehicles = sum(s.mean * s.count for s in loops)
        if _finite(vehicles):
            self.traffic_s += dur
            self.vehicles += vehicles
        for i, key in enumerate(("speed_in_mean", "speed_out_mean")):
            if radar[i]:
                n = float(sum(s.count for s in radar[i]))
                v = sum(s.mean * s.count for s in radar[i]) / n
            else:
                n, v = 1.0, d.get(key, math.nan)
            if _finite(v):
                self.speed[i] += v * n
                self.weight[i] += n
        events = [s for r in radar for s in r]
        if events:
            n_all = float(sum(s.count for s in events))
            v_all = sum(s.mean * s.count for s in events) / n_all
        else:
            v_all = d.get("speed_mean", math.nan)
            n_all = vehicles if _finite(vehicles) and vehicles > 0 else 1.0
        if _finite(v_all):
            self.speed[2] += v_all * n_all
            self.weight[2] += n_all
        occ = d.get("occupancy", math.nan)
        if not _finite(occ):
            occs = [s.mean for s in _stats_by_quantity(w, "occupancy") if math.isfinite(s.mean)]
            occ = sum(occs) / len(occs) if occs else math.nan
        if _finite(occ):
            self.occ_sum += occ * dur
            self.occ_s += dur
        power = d.get("power_mean_w", math.nan)
        if not _finite(power):
            meters = _stats_by_quantity(w, "active_power") or _stats_by_quantity(w, "power")
            power = sum(s.mean for s in meters) if meters else math.nan
        if _finite(power):
            self.power_sum += power * dur
            self.power_s += dur

    def values(self) -> dict[str, float]:
        nan = math.nan
        speeds = [s / n if n > 0 else nan for s, n in zip(self.speed, self.weight, strict=True)]
        return {
            # A stream window with no vehicle event (and so no radar channel) still covers time:
            # once any window of this model window had traffic input, all of them count.
            "flow_veh_h": self.vehicles * 3600 / self.covered_s if self.traffic_s > 0 else nan,
            "speed_in_mean": speeds[0],
            "speed_out_mean": speeds[1],
            "speed_mean": speeds[2],
            "occupancy": self.occ_sum / self.occ_s if self.occ_s > 0 else nan,
            "power_mean_w": self.power_sum / self.power_s if self.power_s > 0 else nan,
        }


@dataclass(frozen=True)
class FeatureRow:
    """The model inputs for one completed model window."""

    start_ns: int
    end_ns: int
    values: npt.NDArray[np.float32]  # shape (n_inputs,), missing inputs already filled
    missing: tuple[str, ...]  # inputs that took their fill value
    current: Mapping[str, float]  # this window's measured quantities (NaN when absent)


class FeatureBuilder:
    """Turns one stream's windows into model feature rows; keeps only the history it needs."""

    def __init__(self, spec: FeatureSpec) -> None:
        if spec.window_s <= 0:
            raise FeatureError(f"window_s must be positive, got {spec.window_s}")
        self.spec = spec
        self._tz = ZoneInfo(spec.timezone)
        self._window_ns = spec.window_s * _NS
        self._parsed = [parse_input(i.name) for i in spec.inputs]
        self._fills = np.array([i.fill for i in spec.inputs], dtype=np.float32)
        depth: dict[str, int] = {}
        for base, lag in self._parsed:
            if base not in TIME_FEATURES:
                depth[base] = max(depth.get(base, 0), lag)
        self._history: dict[str, deque[float]] = {b: deque(maxlen=n + 1) for b, n in depth.items()}
        self._depth = max(depth.values(), default=0) + 1
        self._last_good: dict[str, tuple[float, int]] = {}
        self._weather: dict[str, tuple[float, int]] = {}
        self._open: _Rollup | None = None
        self._last_end_ns: int | None = None
        self.dropped_late = 0

    def observe(self, w: Window) -> None:
        """Take the weather from a window of any stream."""
        self.observe_weather(weather_of(w), w.end_ns)

    def observe_weather(self, values: Mapping[str, float], at_ns: int) -> None:
        for q in WEATHER_QUANTITIES:
            v = values.get(q)
            if v is not None and math.isfinite(v):
                self._weather[q] = (v, at_ns)

    def push(self, w: Window) -> FeatureRow | None:
        """Add a window of the model's stream; returns a row when a model window completes."""
        if w.end_ns - w.start_ns > self._window_ns:
            raise FeatureError(
                f"stream {w.stream!r} windows are {(w.end_ns - w.start_ns) / _NS:g} s, longer "
                f"than the model's {self.spec.window_s} s; configure window_s <= "
                f"{self.spec.window_s} (a divisor of it)"
            )
        self.observe(w)
        bucket = w.start_ns - w.start_ns % self._window_ns
        row: FeatureRow | None = None
        if self._open is not None and bucket != self._open.start_ns:
            if bucket < self._open.start_ns:
                self.dropped_late += 1
                return None
            row = self._close()  # a gap cut the previous model window short
        if self._last_end_ns is not None and bucket < self._last_end_ns:
            self.dropped_late += 1
            return row
        if self._open is None:
            self._open = _Rollup(bucket)
        self._open.add(w)
        if w.end_ns >= bucket + self._window_ns:
            row = self._close()
        return row

    def push_values(self, start_ns: int, values: Mapping[str, float]) -> FeatureRow:
        """Add one whole model window given as quantities (site-data rows, tests)."""
        return self._complete(start_ns, {q: values.get(q, math.nan) for q in WINDOW_QUANTITIES})

    def _close(self) -> FeatureRow:
        assert self._open is not None
        r, self._open = self._open, None
        return self._complete(r.start_ns, r.values())

    def _complete(self, start_ns: int, current: dict[str, float]) -> FeatureRow:
        end_ns = start_ns + self._window_ns
        if self._last_end_ns is not None:
            # Model windows with no stream window at all count as missing history.
            skipped = (start_ns - self._last_end_ns) // self._window_ns
            for _ in range(min(max(skipped, 0), self._depth)):
                for h in self._history.values():
                    h.append(math.nan)
        self._last_end_ns = end_ns
        now: dict[str, float] = {}
        for q in self._history:
            if q in WEATHER_QUANTITIES:
                v, at = self._weather.get(q, (math.nan, end_ns))
                now[q] = v if end_ns - at <= self.spec.hold_s.get(q, 0) * _NS else math.nan
            else:
                now[q] = self._held(q, current.get(q, math.nan), end_ns)
            self._history[q].append(now[q])
        out = self._fills.copy()
        missing: list[str] = []
        times = time_features(end_ns / _NS, self._tz)
        for i, (base, lag) in enumerate(self._parsed):
            if base in TIME_FEATURES:
                v = times[base]
            else:
                h = self._history[base]
                v = h[-1 - lag] if lag < len(h) else math.nan
            if math.isfinite(v):
                out[i] = v
            else:
                missing.append(self.spec.inputs[i].name)
        return FeatureRow(start_ns, end_ns, out, tuple(missing), current)

    def _held(self, q: str, v: float, end_ns: int) -> float:
        if math.isfinite(v):
            self._last_good[q] = (v, end_ns)
            return v
        last = self._last_good.get(q)
        if last is not None and end_ns - last[1] <= self.spec.hold_s.get(q, 0) * _NS:
            return last[0]
        return math.nan


def feature_matrix(
    spec: FeatureSpec, start_ns: Iterable[int], rows: Sequence[Mapping[str, float]]
) -> npt.NDArray[np.float32]:
    """Rows of quantities (weather included) -> the matrix the model sees, one row per window."""
    b = FeatureBuilder(spec)
    out = []
    for s, values in zip(start_ns, rows, strict=True):
        b.observe_weather(values, s + spec.window_s * _NS)
        out.append(b.push_values(s, values).values)
    return np.stack(out) if out else np.zeros((0, len(spec.inputs)), dtype=np.float32)
