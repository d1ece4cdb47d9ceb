"""The skill guard: what a model may publish at a site where it may be worse than doing nothing.

Every forecast is for the model window that follows the one it was made on; persistence's
forecast made at the same time is the current window's value ("the next window is like this
one"). When the target window has been measured, the guard scores both against it.

The promise (target): over any day, the published forecasts' MAE is at most ``margin`` (2 %)
above persistence's. Two rules keep it:

- *Which moves to trust.* A forecast is a move away from persistence of size ``|model -
  persistence|``. The model's record is kept per size class of move (relative to persistence's
  MAE at this site) over ``horizon_s``: a load model earns its skill on the few large moves
  (a charger ending, lamps switching) and is no better than persistence on the many small ones,
  and a traffic model trained elsewhere loses on moves of every size. A move is considered
  only when moves of its size have beaten persistence, by ``Z`` standard errors.
- *How much it may lose.* A published value ``v`` can lose to persistence by at most ``|v -
  persistence|``, known before it goes out. The guard keeps, per 300 s bucket of target windows,
  what the published forecasts lost (or won) against persistence and ``margin`` times
  persistence's error, over the last ``BUDGET_S`` (12 h). Before a forecast goes out it computes
  the room: the least, over every stretch of buckets ending now, of the allowance for that
  stretch (``margin`` x persistence's error so far, plus the unmeasured rest of a 12 h window
  credited at ``CREDIT`` (half) the recent mean rate) minus what published forecasts already
  lost in it (forecasts not yet scored count at their worst). The move is published whole if it
  fits in the room, clipped to the room if not (``source = "blend"``: persistence plus a bounded
  part of the model's move), and not at all when the room is 0. Wins add to the room, so a model
  that is right makes room for its next large move; losses shrink it at once. Any 24 h is two
  12 h windows, each of which stays within its allowance as long as persistence's error over the
  rest of a window is at least the credited rate; what is left to chance is that assumption (a
  busy afternoon followed by a quiet night can break it, hence only half the rate).

A gateway starts on persistence (no record, no room) and takes the model's moves as they prove
themselves. Memory is bounded: per size class and for the published excess one small bucket per
hour of the horizon, for the model's and persistence's errors one per 300 s, 148 budget buckets,
and one pending forecast per stream window of one model window. The room is computed once per
300 s bucket; in between it only shrinks by what the bucket spends, so a forecast costs a few
microseconds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

Source = Literal["model", "blend", "fallback"]

BUCKET_NS: Final = 300 * 10**9
PENDING_MAX: Final = 4096  # forecasts awaiting their window: one per stream window
# Standard errors by which a size class's mean error difference must favour the model. Forecasts
# made on overlapping windows are not independent; the budget, not this test, bounds the loss.
Z: Final = 1.0
MIN_CLASS_N: Final = 6  # scored moves a size class needs before it can be trusted
# Upper edges of the move-size classes, in units of persistence's MAE at the site.
CLASS_EDGES: Final = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
BUDGET_S: Final = 12 * 3600  # the loss budget's window: any day is two of them
BUDGET_BUCKETS: Final = BUDGET_S * 10**9 // BUCKET_NS
# The rest of a budget window is not measured yet: it is credited at this share of the recent
# mean rate of persistence's error. Errors follow the time of day (a busy afternoon before a
# quiet night), so full credit lets single large moves overdraw a quiet stretch.
CREDIT: Final = 0.5
MODEL, PERSISTENCE = 0, 1


@dataclass(frozen=True, slots=True)
class GuardSettings:
    horizon_s: float = 7 * 86_400.0
    margin: float = 0.02  # published MAE may exceed persistence's by this much
    min_evaluated_s: float = 3_600.0  # scored forecasts before the model's moves are considered
    enabled: bool = True


@dataclass(slots=True)
class _Bucket:
    index: int
    sums: list[float]
    n: int = 0


class ErrorLedger:
    """Mean absolute errors of ``k`` forecasters scored on the same windows, over the 300 s
    buckets of the last ``horizon_s``; forecasts wait in a bounded queue for their window."""

    def __init__(self, k: int, horizon_s: float) -> None:
        self.k = k
        self.horizon_s = horizon_s
        self._pending: deque[tuple[int, tuple[float, ...]]] = deque(maxlen=PENDING_MAX)
        self._buckets: deque[_Bucket] = deque()
        self._sums = [0.0] * k
        self._n = 0
        self.evaluations = 0

    def forecast(self, target_end_ns: int, values: tuple[float, ...]) -> None:
        self._pending.append((target_end_ns, values))

    def observe(self, end_ns: int, actual: float) -> bool:
        """Score the forecasts made for the window ending at ``end_ns`` (measured as
        ``actual``, NaN when not measured); True if any was scored."""
        pending = self._pending
        while pending and pending[0][0] < end_ns:
            pending.popleft()  # their window passed unmeasured
        scored = False
        while pending and pending[0][0] == end_ns:
            _, values = pending.popleft()
            if math.isfinite(actual) and all(math.isfinite(v) for v in values):
                self.add(end_ns, [abs(actual - v) for v in values])
                scored = True
        return scored

    def add(self, end_ns: int, errors: list[float]) -> None:
        """Add the errors of one scored forecast for the window ending at ``end_ns``."""
        index = end_ns // BUCKET_NS
        if not self._buckets or self._buckets[-1].index != index:
            self._buckets.append(_Bucket(index, [0.0] * self.k))
        b = self._buckets[-1]
        for i, e in enumerate(errors):
            b.sums[i] += e
            self._sums[i] += e
        b.n += 1
        self._n += 1
        self.evaluations += 1
        oldest = index - int(self.horizon_s * 1e9) // BUCKET_NS
        while self._buckets and self._buckets[0].index <= oldest:
            gone = self._buckets.popleft()
            for i in range(self.k):
                self._sums[i] -= gone.sums[i]
            self._n -= gone.n

    def excess(self, i: int, j: int) -> tuple[float, float] | None:
        """Mean over buckets of (error of ``i`` - error of ``j``) and its standard error over
        the horizon; None with fewer than two buckets."""
        diffs = [(b.sums[i] - b.sums[j]) / b.n for b in self._buckets if b.n]
        n = len(diffs)
        if n < 2:
            return None
        mean = sum(diffs) / n
        var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
        return mean, math.sqrt(var / n)

    def mae(self, i: int) -> float | None:
        return self._sums[i] / self._n if self._n else None

    @property
    def evaluated_s(self) -> float:
        """How much of the horizon holds scored forecasts (300 s per bucket)."""
        return len(self._buckets) * BUCKET_NS / 1e9

    @property
    def pending(self) -> int:
        return len(self._pending)


class _Mean:
    """Mean and standard error of one quantity over the last ``horizon_s``, kept in hourly
    buckets (a week's record needs no finer steps; 168 small buckets)."""

    BUCKET_NS: Final = 3600 * 10**9

    def __init__(self, horizon_s: float) -> None:
        self.horizon_buckets = max(int(horizon_s * 1e9) // self.BUCKET_NS, 1)
        self._buckets: deque[list[float]] = deque()  # [index, sum, sum of squares, n]
        self.sum = self.sum2 = 0.0
        self.n = 0

    def add(self, end_ns: int, value: float) -> None:
        index = end_ns // self.BUCKET_NS
        buckets = self._buckets
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0.0, 0.0, 0])
        b = buckets[-1]
        b[1] += value
        b[2] += value * value
        b[3] += 1
        self.sum += value
        self.sum2 += value * value
        self.n += 1
        oldest = index - self.horizon_buckets
        while buckets and buckets[0][0] <= oldest:
            _, s, s2, n = buckets.popleft()
            self.sum -= s
            self.sum2 -= s2
            self.n -= int(n)

    def mean_se(self) -> tuple[float, float]:
        mean = self.sum / self.n
        var = max(self.sum2 / self.n - mean * mean, 0.0)
        return mean, math.sqrt(var / self.n)

    @property
    def mean(self) -> float | None:
        return self.sum / self.n if self.n else None


@dataclass(frozen=True, slots=True)
class _Pending:
    target_ns: int
    bucket: int
    model: float
    persistence: float
    published: float
    worst: float  # |published - persistence|: the most it can lose against persistence
    size_class: int


class _Budget:
    """Per 300 s bucket of target windows over the last ``BUDGET_S``: ``spent`` = what the
    published forecasts lost against persistence (worst case until scored) minus ``margin``
    times persistence's error, and persistence's error itself. Ring arrays indexed by bucket:
    a slot is reset when its bucket comes round again."""

    SLOTS: Final = BUDGET_BUCKETS + 4  # a pending forecast is a window old at most

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.spent = np.zeros(self.SLOTS)
        self.persistence = np.zeros(self.SLOTS)
        self.ids = np.full(self.SLOTS, -1, dtype=np.int64)
        self.newest = -1
        self._rest = np.arange(BUDGET_BUCKETS - 1, -1, -1, dtype=np.float64)  # n-L, L = 1 .. n
        self._cached_bucket = -1
        self._cached_room = 0.0

    def _slot(self, bucket: int) -> int | None:
        slot = bucket % self.SLOTS
        return slot if self.ids[slot] == bucket else None

    def _advance(self, bucket: int) -> None:
        """Make ``bucket`` the newest: reset the slots of the buckets that come round."""
        if bucket <= self.newest:
            return
        for b in range(max(self.newest + 1, bucket - self.SLOTS + 1), bucket + 1):
            slot = b % self.SLOTS
            self.ids[slot] = b
            self.spent[slot] = self.persistence[slot] = 0.0
        self.newest = bucket

    def spend(self, f: _Pending) -> None:
        self._advance(f.bucket)
        slot = self._slot(f.bucket)
        if slot is not None:
            self.spent[slot] += f.worst

    def scored(self, f: _Pending, excess: float, e_persistence: float) -> None:
        slot = self._slot(f.bucket)
        if slot is not None:
            self.spent[slot] += excess - f.worst - self.margin * e_persistence
            self.persistence[slot] += e_persistence

    def unscored(self, f: _Pending) -> None:
        slot = self._slot(f.bucket)
        if slot is not None:
            self.spent[slot] -= f.worst

    def room(self, bucket: int) -> float:
        """How much a forecast for ``bucket`` may still lose against persistence (>= 0).

        Every stretch ends with ``bucket``, so what is spent in it counts against every
        stretch alike: the least over the stretches of the rest is computed once per bucket
        (older buckets only gain room as their forecasts are scored, so the cached value errs
        on the safe side until the next bucket)."""
        self._advance(bucket)
        if bucket != self._cached_bucket:
            self._cached_bucket = bucket
            self._cached_room = self._room_before(bucket)
        slot = self._slot(bucket)
        spent = float(self.spent[slot]) if slot is not None else 0.0
        return max(self._cached_room - spent, 0.0)

    def _room_before(self, bucket: int) -> float:
        # Every slot holds one of the SLOTS buckets up to ``bucket`` (see _advance).
        n = BUDGET_BUCKETS
        slots = _BEFORE[bucket % self.SLOTS]  # the n buckets before, newest first
        allowance = CREDIT * self.margin * float(self.persistence[slots].sum()) / n
        # Stretch of length L (buckets bucket-L+1 .. bucket): the allowance for the rest of its
        # window, minus what its L-1 buckets before this one spent.
        totals = np.cumsum(self.spent[slots[:-1]])
        return min(allowance * (n - 1), float((allowance * self._rest[1:] - totals).min()))


# Row r: the ring slots of the BUDGET_BUCKETS buckets before the one in slot r, newest first.
_BEFORE: Final = ((np.arange(_Budget.SLOTS)[:, None] - np.arange(1, BUDGET_BUCKETS + 1))
                  % _Budget.SLOTS).astype(np.int16)


class SkillGuard:
    """What to publish for one model's forecasts: the model's value, persistence's, or the
    model's move clipped to what the error budget can still lose (see the module docstring)."""

    def __init__(self, settings: GuardSettings = GuardSettings()) -> None:
        self.settings = settings
        self.ledger = ErrorLedger(2, settings.horizon_s)  # model vs persistence: what status shows
        self.published = _Mean(settings.horizon_s)
        self.classes = [_Mean(settings.horizon_s) for _ in range(len(CLASS_EDGES) + 1)]
        self.budget = _Budget(settings.margin)
        self._pending: deque[_Pending] = deque(maxlen=PENDING_MAX)
        self.source: Source = "fallback" if settings.enabled else "model"
        self.room: float = 0.0
        self.switches = 0

    # -- scoring -------------------------------------------------------------------------------

    def observe(self, end_ns: int, actual: float) -> None:
        """The model window ending at ``end_ns`` was measured as ``actual`` (NaN: not
        measured): score the forecasts that were made for it."""
        pending = self._pending
        while pending and pending[0].target_ns < end_ns:
            self.budget.unscored(pending.popleft())  # its window passed unmeasured
        while pending and pending[0].target_ns == end_ns:
            f = pending.popleft()
            if not math.isfinite(actual):
                self.budget.unscored(f)
                continue
            e_model, e_pers = abs(actual - f.model), abs(actual - f.persistence)
            e_pub = abs(actual - f.published)
            self.ledger.add(end_ns, [e_model, e_pers])
            self.published.add(end_ns, e_pub - e_pers)
            if f.size_class >= 0:
                self.classes[f.size_class].add(end_ns, e_model - e_pers)
            self.budget.scored(f, e_pub - e_pers, e_pers)

    # -- forecasting ---------------------------------------------------------------------------

    def forecast(self, target_end_ns: int, model: float,
                 persistence: float) -> tuple[float, Source]:
        """Remember the forecasts for the window ending at ``target_end_ns``; return the value
        to publish and where it came from."""
        if not math.isfinite(persistence):
            self.source = "model"
            return model, "model"  # nothing to fall back on
        bucket = (target_end_ns - 1) // BUCKET_NS
        move = model - persistence
        size_class = self._size_class(abs(move)) if math.isfinite(move) else -1
        published: float = persistence
        source: Source = "fallback"
        if not self.settings.enabled:
            published, source = model, "model"
        elif size_class >= 0 and self._wins(size_class):
            self.room = room = self.budget.room(bucket)
            step = max(-room, min(room, move))
            if step == move:
                published, source = model, "model"
            elif step != 0.0:
                published, source = persistence + step, "blend"
        if source != self.source:
            self.switches += 1
            self.source = source
        worst = abs(published - persistence)  # the most this can lose against persistence
        f = _Pending(target_end_ns, bucket, model, persistence, published, worst, size_class)
        if len(self._pending) == self._pending.maxlen:
            self.budget.unscored(self._pending[0])
        self._pending.append(f)
        self.budget.spend(f)
        return published, source

    def _size_class(self, move: float) -> int:
        scale = self.ledger.mae(PERSISTENCE)
        if scale is None or scale <= 0:
            return -1
        ratio = move / scale
        return next((i for i, edge in enumerate(CLASS_EDGES) if ratio < edge), len(CLASS_EDGES))

    def _wins(self, size_class: int) -> bool:
        """Whether the model's moves of this size have beaten persistence at this site: mean
        error difference below zero by ``Z`` standard errors."""
        if self.ledger.evaluated_s < self.settings.min_evaluated_s:
            return False
        record = self.classes[size_class]
        if record.n < MIN_CLASS_N:
            return False
        mean, se = record.mean_se()
        return mean + Z * se < 0.0

    # -- what health shows ---------------------------------------------------------------------

    @property
    def model_mae(self) -> float | None:
        return self.ledger.mae(MODEL)

    @property
    def persistence_mae(self) -> float | None:
        return self.ledger.mae(PERSISTENCE)

    @property
    def published_mae(self) -> float | None:
        excess, persistence = self.published.mean, self.persistence_mae
        return None if excess is None or persistence is None else persistence + excess

    @property
    def evaluated_s(self) -> float:
        return self.ledger.evaluated_s

    @property
    def evaluations(self) -> int:
        return self.ledger.evaluations

    @property
    def pending(self) -> int:
        """Forecasts waiting for their window to be measured."""
        return len(self._pending)

    @property
    def skill(self) -> float | None:
        """1 - model MAE / persistence MAE over the horizon: > 0 beats persistence."""
        model, persistence = self.model_mae, self.persistence_mae
        if model is None or persistence is None or persistence <= 0:
            return None
        return 1.0 - model / persistence

    def status(self) -> dict[str, Any]:
        skill, published, persistence = self.skill, self.published_mae, self.persistence_mae
        published_skill = (None if published is None or persistence is None or persistence <= 0
                           else round(1.0 - published / persistence, 4))
        return {
            "source": self.source, "enabled": self.settings.enabled,
            "skill": None if skill is None else round(skill, 4),
            "published_skill": published_skill,
            "model_mae": _rounded(self.model_mae),
            "persistence_mae": _rounded(persistence),
            "published_mae": _rounded(published),
            "room": round(self.room, 4),
            "evaluated_s": self.evaluated_s, "evaluations": self.evaluations,
            "switches": self.switches,
            "trusted_move_classes": sum(1 for i in range(len(self.classes)) if self._wins(i)),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str
    candidate_mae: float | None
    active_mae: float | None
    persistence_mae: float | None
    evaluated_s: float


class ShadowComparison:
    """A shadow candidate against the active model and persistence, on the same live windows."""

    CANDIDATE, ACTIVE, PERSISTENCE = 0, 1, 2

    def __init__(self, horizon_s: float) -> None:
        self.ledger = ErrorLedger(3, horizon_s)

    def forecast(self, target_end_ns: int, candidate: float, active: float,
                 persistence: float) -> None:
        self.ledger.forecast(target_end_ns, (candidate, active, persistence))

    def observe(self, end_ns: int, actual: float) -> None:
        self.ledger.observe(end_ns, actual)

    def verdict(self, margin: float, min_evaluated_s: float) -> Verdict:
        """Whether the candidate beats both the active model and persistence by ``margin`` on
        at least ``min_evaluated_s`` of live windows."""
        cand, active, pers = (self.ledger.mae(i) for i in range(3))
        seen = self.ledger.evaluated_s

        def v(ok: bool, reason: str) -> Verdict:
            return Verdict(ok, reason, cand, active, pers, seen)

        if cand is None or active is None or pers is None or seen < min_evaluated_s:
            return v(False, f"only {seen:.0f} s of live windows scored, {min_evaluated_s:.0f} s "
                            "needed")
        best = min(active, pers)
        numbers = (f"candidate MAE {cand:.4g}, active {active:.4g}, persistence {pers:.4g} "
                   f"over {seen:.0f} s")
        if cand <= best * (1.0 - margin):
            return v(True, f"the candidate wins: {numbers}")
        return v(False, f"the candidate does not beat the better of the active model and "
                        f"persistence by {margin:.0%}: {numbers}")

    def status(self) -> dict[str, Any]:
        cand, active, pers = (self.ledger.mae(i) for i in range(3))
        return {"candidate_mae": _rounded(cand), "active_mae": _rounded(active),
                "persistence_mae": _rounded(pers), "evaluated_s": self.ledger.evaluated_s}
