"""The skill guard: a model publishes its forecast only while it beats doing nothing.

Every forecast is for the model window that follows the one it was made on. When that window
has been measured, the guard scores the forecast and the persistence forecast made at the same
time (the current window's value, "the next window is like this one") against the measured
value, and adds both absolute errors to 300 s buckets, kept per UTC hour of the day over the
last ``horizon_s``.

In each hour of the day the model's forecast is published only when, on that hour's record,
its error is below persistence's by ``margin`` beyond the noise (a paired comparison over the
300 s buckets, two standard errors; forecasts inside one bucket overlap and are far from
independent). A gateway therefore starts on persistence, and a model that is good at night
and poor at the morning peak is used at night only. As soon as the model is worse than
persistence on an hour's record, that hour goes back to persistence, marked ``fallback``; there
is no margin on the way back, on purpose. Memory is bounded by the horizon: one small bucket per
300 s, and one pending forecast per stream window of one model window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal

Source = Literal["model", "fallback"]

BUCKET_NS: Final = 300 * 10**9
PENDING_MAX: Final = 4096  # forecasts awaiting their window: one per stream window
# Standard errors a difference of errors must clear to count: a paired test over 300 s
# buckets (forecasts inside one bucket overlap and are far from independent).
Z: Final = 2.0


@dataclass(frozen=True, slots=True)
class GuardSettings:
    horizon_s: float = 7 * 86_400.0
    margin: float = 0.02
    min_evaluated_s: float = 3_600.0  # per hour of the day: one day's worth
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
                self._add(end_ns, [abs(actual - v) for v in values])
                scored = True
        return scored

    def _add(self, end_ns: int, errors: list[float]) -> None:
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


class SkillGuard:
    """Running MAE of a model and of persistence, per hour of the day, and the choice.

    A model's skill depends on the hour: a model trained elsewhere may be fine at night and
    poor at the morning peak, and a load model beats persistence when chargers start but not in
    the quiet hours. So the choice is made per UTC hour of the forecast window, on that hour's
    own record over the horizon (e.g. the last week of 07:00-08:00 windows)."""

    MODEL, PERSISTENCE = 0, 1

    def __init__(self, settings: GuardSettings = GuardSettings()) -> None:
        self.settings = settings
        self.ledger = ErrorLedger(2, settings.horizon_s)  # every hour: what status shows
        self.hours = [ErrorLedger(2, settings.horizon_s) for _ in range(24)]
        first: Source = "fallback" if settings.enabled else "model"
        self.hour_source: list[Source] = [first] * 24
        self.source: Source = first
        self.switches = 0

    @staticmethod
    def hour_of(end_ns: int) -> int:
        """UTC hour of the start of the 300 s window ending at ``end_ns``."""
        return int((end_ns - BUCKET_NS) // (3600 * 10**9)) % 24

    # -- scoring -------------------------------------------------------------------------------

    def observe(self, end_ns: int, actual: float) -> None:
        """The model window ending at ``end_ns`` was measured as ``actual`` (NaN: not
        measured): score the forecasts that were made for it."""
        self.ledger.observe(end_ns, actual)
        hour = self.hour_of(end_ns)
        if self.hours[hour].observe(end_ns, actual):
            self._decide(hour)

    def _decide(self, hour: int) -> None:
        if not self.settings.enabled:
            return
        s = self.settings
        ledger = self.hours[hour]
        before = self.hour_source[hour]
        persistence = ledger.mae(self.PERSISTENCE)
        excess = ledger.excess(self.MODEL, self.PERSISTENCE)
        source = before
        if excess is None or persistence is None or ledger.evaluated_s < s.min_evaluated_s:
            source = "fallback"
        elif excess[0] > 0:
            source = "fallback"  # worse than doing nothing in this hour
        elif excess[0] + Z * excess[1] < -s.margin * persistence:
            source = "model"  # better by the margin, beyond the noise of the record
        if source != before:
            self.hour_source[hour] = source
            self.switches += 1

    # -- forecasting ---------------------------------------------------------------------------

    def forecast(self, target_end_ns: int, model: float,
                 persistence: float) -> tuple[float, Source]:
        """Remember both forecasts for the window ending at ``target_end_ns``; return the one
        to publish and where it came from."""
        self.ledger.forecast(target_end_ns, (model, persistence))
        hour = self.hour_of(target_end_ns)
        self.hours[hour].forecast(target_end_ns, (model, persistence))
        self.source = self.hour_source[hour]
        if self.source == "model" or not math.isfinite(persistence):
            return model, "model"
        return persistence, "fallback"

    # -- what health shows ---------------------------------------------------------------------

    @property
    def model_mae(self) -> float | None:
        return self.ledger.mae(self.MODEL)

    @property
    def persistence_mae(self) -> float | None:
        return self.ledger.mae(self.PERSISTENCE)

    @property
    def evaluated_s(self) -> float:
        return self.ledger.evaluated_s

    @property
    def evaluations(self) -> int:
        return self.ledger.evaluations

    @property
    def skill(self) -> float | None:
        """1 - model MAE / persistence MAE over the horizon: > 0 beats persistence."""
        model, persistence = self.model_mae, self.persistence_mae
        if model is None or persistence is None or persistence <= 0:
            return None
        return 1.0 - model / persistence

    def status(self) -> dict[str, Any]:
        skill = self.skill
        return {
            "source": self.source, "enabled": self.settings.enabled,
            "skill": None if skill is None else round(skill, 4),
            "model_mae": _rounded(self.model_mae),
            "persistence_mae": _rounded(self.persistence_mae),
            "evaluated_s": self.evaluated_s, "evaluations": self.evaluations,
            "switches": self.switches,
            "model_hours": sum(1 for s in self.hour_source if s == "model"),
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
