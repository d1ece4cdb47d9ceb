"""Feature vectors for the edge models, built from stream windows.

A model's manifest names its inputs in order; this module computes each name from the windows:

- per-window quantities (the site-data CSV columns, CHANNELS.md ``derived`` names):
  ``flow_veh_h``, ``speed_in_mean``, ``speed_out_mean``, ``speed_mean``, ``occupancy``,
  ``power_mean_w``, and the weather ``temperature``, ``humidity``;
- ``<quantity>_lag<N>``: the quantity over the model window ending N model windows earlier;
- time at the end of the current window (the start of the window being predicted), in the
  model's time zone: ``hour_sin``/``hour_cos`` (fractional hour), ``dow_sin``/``dow_cos``
  (Monday = 0), ``doy_sin``/``doy_cos`` (day of year).

Models work on windows of ``window_s`` (W, 300 s for the shipped ones). The roll-up slides: each
stream window that closes at E gives one feature row, for the model window (E - W, E], made of
the stream windows whose start falls in [E - W, E): counts summed, speeds weighted by vehicles,
occupancy and power weighted by the time covered. ``<q>_lagN`` is the same roll-up over the
model window ending at E - N*W. Training rows are whole, aligned model windows (``push_values``);
they are the special case of an aligned E and go through the same lag, hold and fill code, so a
gateway feeding 10 s windows gets, at every aligned E, exactly the row training would build.

Missing values: a quantity with no value in the model window ending at T takes the value of the
window ending at T - k*W for the smallest k with k*W <= ``hold_s[quantity]``; past that it is
missing and the input takes the manifest's ``fill`` (a start-up with less than W of history
uses what there is). Weather is the latest reading of any stream's ``*.temperature`` /
``*.humidity`` channels (or fused groups of those names) at or before T, if no older than its
hold. History is a bounded ring of recent stream windows: (largest lag + 1) * W plus the longest
hold, and at most ``MAX_HISTORY_WINDOWS`` windows.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast
from zoneinfo import ZoneInfo

import numpy as np

from agent.pipeline.localtime import TIME_FEATURES, LocalTime
from agent.readings import ChannelStats, Window

if TYPE_CHECKING:  # numpy.typing is for the checker; the agent does not load it
    import numpy.typing as npt

log = logging.getLogger(__name__)

TRAFFIC_QUANTITIES = ("flow_veh_h", "speed_in_mean", "speed_out_mean", "speed_mean", "occupancy")
ENERGY_QUANTITIES = ("power_mean_w",)
WEATHER_QUANTITIES = ("temperature", "humidity")
WINDOW_QUANTITIES = TRAFFIC_QUANTITIES + ENERGY_QUANTITIES
# Energy's lag287 (a day back) on 60 s windows keeps 1,455 stream windows (~1 MB), on 10 s
# windows 8,730 (~4 MB); the cap bounds one model's history to ~9 MB whatever the stream.
MAX_HISTORY_WINDOWS = 16_384
MAX_WEATHER_READINGS = 4_096
_LAG = re.compile(r"^(?P<base>[a-z_]+?)_lag(?P<lag>[1-9][0-9]{0,3})$")
_NS = 1_000_000_000
_A = TypeVar("_A", bound=np.ndarray[Any, Any])

# One stream window's contribution to a model window: sums that add across windows.
(_DUR, _TRAFFIC_S, _VEHICLES, _S_IN, _N_IN, _S_OUT, _N_OUT, _S_ALL, _N_ALL,
 _OCC, _OCC_S, _POWER, _POWER_S) = range(13)
_PARTS = 13
_COVERED = len(WINDOW_QUANTITIES)  # period vectors: WINDOW_QUANTITIES, then the time covered
_NAN_PERIOD = [math.nan] * len(WINDOW_QUANTITIES) + [0.0]


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


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


_Groups = dict[str, list[ChannelStats]]
_NONE: list[ChannelStats] = []


def by_quantity(w: Window) -> _Groups:
    """The window's channels with readings, by quantity (``radar.speed_in`` -> ``speed_in``)."""
    out: _Groups = {}
    for ch, s in w.channels.items():
        if s.count > 0:
            out.setdefault(ch.rsplit(".", 1)[-1], []).append(s)
    return out


def weather_of(w: Window, groups: _Groups | None = None) -> dict[str, float]:
    """Mean of the window's temperature / humidity channels (or fused groups of that name)."""
    g = by_quantity(w) if groups is None else groups
    out: dict[str, float] = {}
    for q in WEATHER_QUANTITIES:
        fused = w.fused.get(q)
        if fused is not None and fused.count > 0 and math.isfinite(fused.mean):
            out[q] = fused.mean
            continue
        means = [s.mean for s in g.get(q, _NONE) if math.isfinite(s.mean)]
        if means:
            out[q] = sum(means) / len(means)
    return out


def contribution(w: Window, groups: _Groups | None = None) -> list[float]:
    """What one stream window adds to the model windows it falls in (see ``_PARTS``)."""
    g = by_quantity(w) if groups is None else groups
    p = [0.0] * _PARTS
    dur = (w.end_ns - w.start_ns) / _NS
    p[_DUR] = dur
    d = w.derived
    radar = [g.get("speed_in", _NONE), g.get("speed_out", _NONE)]
    loops = g.get("vehicle_count", _NONE)
    vehicles = d.get("vehicles", math.nan)
    if not _finite(vehicles):
        if any(radar):
            vehicles = float(sum(s.count for r in radar for s in r))
        elif loops:
            vehicles = sum(s.mean * s.count for s in loops)
    if _finite(vehicles):
        p[_TRAFFIC_S], p[_VEHICLES] = dur, vehicles
    for r, key, at in ((radar[0], "speed_in_mean", _S_IN), (radar[1], "speed_out_mean", _S_OUT)):
        if r:
            total, n = sum(s.mean * s.count for s in r), float(sum(s.count for s in r))
        else:
            total, n = d.get(key, math.nan), 1.0
        if _finite(total):
            p[at], p[at + 1] = total, n
    events = radar[0] + radar[1]
    if events:
        total, n = sum(s.mean * s.count for s in events), float(sum(s.count for s in events))
    else:
        n = vehicles if _finite(vehicles) and vehicles > 0 else 1.0
        total = d.get("speed_mean", math.nan) * n
    if _finite(total):
        p[_S_ALL], p[_N_ALL] = total, n
    occ = d.get("occupancy", math.nan)
    if not _finite(occ):
        occs = [s.mean for s in g.get("occupancy", _NONE) if math.isfinite(s.mean)]
        occ = sum(occs) / len(occs) if occs else math.nan
    if _finite(occ):
        p[_OCC], p[_OCC_S] = occ * dur, dur
    power = d.get("power_mean_w", math.nan)
    if not _finite(power):
        meters = g.get("active_power") or g.get("power", _NONE)
        power = sum(s.mean for s in meters) if meters else math.nan
    if _finite(power):
        p[_POWER], p[_POWER_S] = power * dur, dur
    return p


def _values_of(sums: npt.NDArray[np.float64]) -> list[float]:
    """Summed contributions -> the period vector (WINDOW_QUANTITIES order, then covered s)."""
    s = sums.tolist()
    nan = math.nan
    return [
        # A stream window with no vehicle event (and so no radar channel) still covers time:
        # once any window of this model window had traffic input, all of them count.
        s[_VEHICLES] * 3600 / s[_DUR] if s[_TRAFFIC_S] > 0 else nan,
        s[_S_IN] / s[_N_IN] if s[_N_IN] > 0 else nan,
        s[_S_OUT] / s[_N_OUT] if s[_N_OUT] > 0 else nan,
        s[_S_ALL] / s[_N_ALL] if s[_N_ALL] > 0 else nan,
        s[_OCC] / s[_OCC_S] if s[_OCC_S] > 0 else nan,
        s[_POWER] / s[_POWER_S] if s[_POWER_S] > 0 else nan,
        s[_DUR],
    ]


def rollup(windows: Iterable[Window]) -> dict[str, float]:
    """The model-window quantities of a set of stream windows (the definition the ring uses)."""
    parts = np.array([contribution(w) for w in windows], dtype=np.float64).reshape(-1, _PARTS)
    v = _values_of(parts.sum(axis=0))
    return dict(zip(WINDOW_QUANTITIES, v, strict=False))


class _Ring:
    """Recent stream windows, oldest first: span, contribution and the roll-up ending at each.

    Rows live in arrays that grow by doubling and are compacted in place, so the sums over a
    model window are one contiguous slice.
    """

    def __init__(self, window_ns: int, horizon_ns: int, cap: int) -> None:
        self.window_ns, self.horizon_ns, self.cap = window_ns, horizon_ns, cap
        self.starts = np.zeros(64, dtype=np.int64)
        self.ends = np.zeros(64, dtype=np.int64)
        self.parts = np.zeros((64, _PARTS))
        self.periods = np.zeros((64, _COVERED + 1))
        self.head = self.n = self.base = 0
        self.row_of_end: dict[int, int] = {}  # end ns -> base + row
        self.capped = 0

    def __len__(self) -> int:
        return self.n - self.head

    def append(self, start_ns: int, end_ns: int, part: Sequence[float]) -> int:
        if self.n == len(self.starts):
            self._make_room()
        i = self.n
        self.starts[i], self.ends[i] = start_ns, end_ns
        self.parts[i] = part
        self.n += 1
        self.row_of_end[end_ns] = self.base + i
        return i

    def _make_room(self) -> None:
        live, size = self.n - self.head, len(self.starts)
        if live * 4 > size * 3:  # else compacting frees a quarter or more: amortised O(1)
            size *= 2
        self.starts = self._moved(self.starts, size)
        self.ends = self._moved(self.ends, size)
        self.parts = self._moved(self.parts, size)
        self.periods = self._moved(self.periods, size)
        self.base += self.head
        self.head, self.n = 0, live

    def _moved(self, a: _A, size: int) -> _A:
        b = cast(_A, np.zeros((size, *a.shape[1:]), dtype=a.dtype)) if size > len(a) else a
        b[:self.n - self.head] = a[self.head:self.n]  # numpy copies overlapping slices safely
        return b

    def prune(self, now_ns: int) -> None:
        """Forget windows that start before ``now - horizon`` or exceed the count cap."""
        live = self.starts[self.head:self.n]
        drop = int(live.searchsorted(now_ns - self.horizon_ns))
        if len(live) - drop > self.cap:
            self.capped += len(live) - drop - self.cap
            drop = len(live) - self.cap
        for e in self.ends[self.head:self.head + drop].tolist():
            del self.row_of_end[e]
        self.head += drop

    def sums(self, start_ns: int, end_ns: int) -> list[float]:
        """The period vector of the windows starting in [start, end)."""
        live = self.starts[self.head:self.n]
        lo = int(live.searchsorted(start_ns))
        hi = int(live.searchsorted(end_ns))
        if lo >= hi:
            return _NAN_PERIOD
        return _values_of(np.add.reduce(self.parts[self.head + lo:self.head + hi], axis=0))

    def period(self, end_ns: int) -> list[float]:
        """The roll-up of the model window ending at ``end_ns``."""
        row = self.row_of_end.get(end_ns)
        if row is not None:
            out: list[float] = self.periods[row - self.base].tolist()
            return out
        return self.sums(end_ns - self.window_ns, end_ns)


@dataclass(frozen=True)
class FeatureRow:
    """The model inputs for the model window (start_ns, end_ns], which ends with the stream
    window that produced it."""

    start_ns: int
    end_ns: int
    values: npt.NDArray[np.float32]  # shape (n_inputs,), missing inputs already filled
    missing: tuple[str, ...]  # inputs that took their fill value
    current: Mapping[str, float]  # this window's measured quantities (NaN when absent)
    covered_s: float = 0.0  # time the stream windows in this model window cover


class FeatureBuilder:
    """Turns one stream's windows into model feature rows; keeps only the history it needs."""

    def __init__(self, spec: FeatureSpec) -> None:
        if spec.window_s <= 0:
            raise FeatureError(f"window_s must be positive, got {spec.window_s}")
        self.spec = spec
        self._clock = LocalTime(ZoneInfo(spec.timezone))
        self._window_ns = spec.window_s * _NS
        self._parsed = [parse_input(i.name) for i in spec.inputs]
        self._names = spec.names
        self._fill_values = [i.fill for i in spec.inputs]
        self._hold_ns = {q: spec.hold_s.get(q, 0) * _NS for q in WINDOW_QUANTITIES
                         + WEATHER_QUANTITIES}
        index = {q: i for i, q in enumerate(WINDOW_QUANTITIES)}
        self._time_inputs = [(i, b) for i, (b, _) in enumerate(self._parsed) if b in TIME_FEATURES]
        self._weather_inputs = [(i, b, lag) for i, (b, lag) in enumerate(self._parsed)
                                if b in WEATHER_QUANTITIES]
        self._window_inputs = [(i, index[b], lag, self._hold_ns[b])
                               for i, (b, lag) in enumerate(self._parsed) if b in index]
        # The window inputs by lag (ns back from the row's end): one period lookup per lag.
        by_lag: dict[int, list[tuple[int, int, float]]] = {}
        for i, q, lag, hold_ns in self._window_inputs:
            by_lag.setdefault(lag * self._window_ns, []).append((i, q, hold_ns))
        self._lagged = list(by_lag.items())
        lags = [lag for base, lag in self._parsed if base in WINDOW_QUANTITIES]
        holds = [self._hold_periods(base) for base, _ in self._parsed if base in WINDOW_QUANTITIES]
        horizon = (max(lags, default=0) + max(holds, default=0) + 1) * self._window_ns
        self._ring = _Ring(self._window_ns, horizon, MAX_HISTORY_WINDOWS)
        w_lags = [lag for base, lag in self._parsed if base in WEATHER_QUANTITIES]
        self._weather_keep_ns = (max(w_lags, default=0) + 1) * self._window_ns
        self._weather: dict[str, deque[tuple[int, float]]] = {
            q: deque(maxlen=MAX_WEATHER_READINGS) for q in WEATHER_QUANTITIES}
        self._last_end_ns: int | None = None
        self.dropped_late = 0

    def _hold_periods(self, q: str) -> int:
        k = 0
        while (k + 1) * self._window_ns <= self._hold_ns[q]:
            k += 1
        return k

    @property
    def history_windows(self) -> int:
        """Stream windows held for lags and holds (bounded)."""
        return len(self._ring)

    def observe(self, w: Window) -> None:
        """Take the weather from a window of any stream."""
        self.observe_weather(weather_of(w), w.end_ns)

    def observe_weather(self, values: Mapping[str, float], at_ns: int) -> None:
        for q in WEATHER_QUANTITIES:
            v = values.get(q)
            if v is None or not math.isfinite(v):
                continue
            dq = self._weather[q]
            if dq and at_ns < dq[-1][0]:  # another stream's window, closed out of order
                if len(dq) == dq.maxlen:
                    dq.popleft()
                bisect.insort(dq, (at_ns, v))
            else:
                dq.append((at_ns, v))
            cutoff = dq[-1][0] - self._weather_keep_ns
            while len(dq) > 1 and dq[1][0] <= cutoff:
                dq.popleft()

    def push(self, w: Window) -> FeatureRow | None:
        """Add a window of the model's stream; returns the row for the model window ending with
        it (None for a window that starts before the previous one ended: late, dropped)."""
        if w.end_ns - w.start_ns > self._window_ns:
            raise FeatureError(
                f"stream {w.stream!r} windows are {(w.end_ns - w.start_ns) / _NS:g} s, longer "
                f"than the model's {self.spec.window_s} s; configure window_s <= "
                f"{self.spec.window_s} (a divisor of it)"
            )
        if w.end_ns <= w.start_ns:
            raise FeatureError(f"stream {w.stream!r} window [{w.start_ns}, {w.end_ns}) ns "
                               "does not end after it starts")
        groups = by_quantity(w)
        self.observe_weather(weather_of(w, groups), w.end_ns)
        if self._last_end_ns is not None and w.start_ns < self._last_end_ns:
            self.dropped_late += 1
            return None
        end = w.end_ns
        i = self._add(w.start_ns, end, contribution(w, groups))
        ring = self._ring
        current = ring.sums(end - self._window_ns, end)
        ring.periods[i] = current
        self._prune(end)
        return self._row(end, current)

    def push_values(self, start_ns: int, values: Mapping[str, float]) -> FeatureRow:
        """Add one whole model window given as quantities (site-data rows, tests)."""
        if self._last_end_ns is not None and start_ns < self._last_end_ns:
            raise FeatureError(f"model window at {start_ns} ns starts before the previous one "
                               f"ended ({self._last_end_ns} ns)")
        end = start_ns + self._window_ns
        current = [values.get(q, math.nan) for q in WINDOW_QUANTITIES] + [float(self.spec.window_s)]
        i = self._add(start_ns, end, self._part_of(current))
        self._ring.periods[i] = current
        self._prune(end)
        return self._row(end, current)

    def _add(self, start_ns: int, end_ns: int, part: Sequence[float]) -> int:
        self._last_end_ns = end_ns
        return self._ring.append(start_ns, end_ns, part)

    def _prune(self, now_ns: int) -> None:
        ring = self._ring
        ring.prune(now_ns)
        if ring.capped:
            log.warning("feature history capped at %d stream windows: %d older windows "
                        "forgotten, their lag inputs take the fill value",
                        MAX_HISTORY_WINDOWS, ring.capped)
            ring.capped = 0

    def _part_of(self, v: Sequence[float]) -> list[float]:
        """A whole model window as a contribution (used only if a period is rebuilt from it)."""
        dur = float(self.spec.window_s)
        p = [0.0] * _PARTS
        p[_DUR] = dur
        if math.isfinite(v[0]):
            p[_TRAFFIC_S], p[_VEHICLES] = dur, v[0] * dur / 3600
        for k, at in ((1, _S_IN), (2, _S_OUT), (3, _S_ALL)):
            if math.isfinite(v[k]):
                p[at], p[at + 1] = v[k], 1.0
        for k, at in ((4, _OCC), (5, _POWER)):
            if math.isfinite(v[k]):
                p[at], p[at + 1] = v[k] * dur, dur
        return p

    def _row(self, end_ns: int, current: list[float]) -> FeatureRow:
        isfinite = math.isfinite
        vals = [math.nan] * len(self._parsed)
        if self._time_inputs:
            times = self._clock.features(end_ns / _NS)
            for i, name in self._time_inputs:
                vals[i] = times[name]
        for i, name, lag in self._weather_inputs:
            vals[i] = self._weather_at(name, end_ns - lag * self._window_ns)
        periods: dict[int, list[float]] = {end_ns: current}
        for back_ns, inputs in self._lagged:
            t = end_ns - back_ns
            p = periods.get(t)
            if p is None:
                p = periods[t] = self._ring.period(t)
            for i, q, hold_ns in inputs:
                v = p[q]
                vals[i] = v if isfinite(v) else self._held(q, hold_ns, t, periods)
        missing = []
        for i, v in enumerate(vals):
            if not isfinite(v):
                vals[i] = self._fill_values[i]
                missing.append(self._names[i])
        return FeatureRow(end_ns - self._window_ns, end_ns, np.array(vals, dtype=np.float32),
                          tuple(missing), dict(zip(WINDOW_QUANTITIES, current, strict=False)),
                          current[_COVERED])

    def _held(self, q: int, hold_ns: float, at_ns: int, periods: dict[int, list[float]]) -> float:
        """The value of the window ending at ``at_ns`` - k*W for the least k within the hold
        (k = 0 is known to be missing)."""
        k = 1
        while k * self._window_ns <= hold_ns:
            t = at_ns - k * self._window_ns
            p = periods.get(t)
            if p is None:
                p = periods[t] = self._ring.period(t)
            if math.isfinite(p[q]):
                return p[q]
            k += 1
        return math.nan

    def _weather_at(self, q: str, at_ns: int) -> float:
        for t, v in reversed(self._weather[q]):
            if t <= at_ns:
                return v if at_ns - t <= self._hold_ns[q] else math.nan
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
