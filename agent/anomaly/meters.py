"""Detectors for the meters themselves: stuck or flatlined, single-window spikes, drift.

All three compare a meter with its own recent past and, where the cabinet has one, with the
redundant check meter on the same feed: a fault of the meter shows on one meter only, a real
change of load on both.
"""

from __future__ import annotations

import math
from collections import deque

from agent.anomaly.events import AnomalyEvent, EventType, Evidence, Latch, Severity
from agent.anomaly.sample import Sample
from agent.anomaly.thresholds import DriftThresholds, SpikeThresholds, StuckThresholds


class Episode:
    """A latch plus the event it opened, so the close carries the same identity."""

    __slots__ = ("channel", "event", "latch", "stream", "type")

    def __init__(self, type_: EventType, stream: str, channel: str, latch: Latch) -> None:
        self.type: EventType = type_
        self.stream = stream
        self.channel = channel
        self.latch = latch
        self.event: AnomalyEvent | None = None

    def step(self, cond: bool | None, s: Sample, severity: Severity, evidence: Evidence,
             start_ns: int | None = None) -> AnomalyEvent | None:
        change = self.latch.update(cond, s.start_ns, s.end_ns)
        if change == "open":
            start = self.latch.first_true_ns if start_ns is None else start_ns
            self.event = AnomalyEvent(self.type, self.stream, self.channel, start, s.end_ns,
                                      severity, evidence)
            return self.event
        if change == "close" and self.event is not None:
            done = self.event.closed(self.latch.last_true_end_ns)
            self.event = None
            return done
        return None

    def abandon(self, end_ns: int) -> AnomalyEvent | None:
        """Close without waiting for the clear count (the detector can no longer judge)."""
        self.latch.reset()
        if self.event is None:
            return None
        done = self.event.closed(end_ns)
        self.event = None
        return done


class StuckDetector:
    """A meter repeating its last value exactly, or a feed meter reading ~0 W under load.

    A real load always moves a window mean by more than the meter's resolution; a frozen
    register or a dead Modbus slave answering from cache does not.
    """

    def __init__(self, stream: str, channel: str, th: StuckThresholds) -> None:
        self.th = th
        self.ep = Episode("meter_stuck", stream, channel,
                          Latch(th.frozen_windows - 1, th.clear_windows))
        self._prev = math.nan
        self._prev_start = 0
        self._run_start = 0
        self._len = 0

    @property
    def is_open(self) -> bool:
        return self.ep.event is not None

    def update(self, s: Sample, value: float, ref: float) -> AnomalyEvent | None:
        if math.isnan(value):
            self._prev = math.nan
            return None
        frozen = value == self._prev
        # With both meters near zero the cabinet is without power, not the meter broken.
        zero = value < self.th.zero_w and not (ref < self.th.zero_w)
        cond = frozen or zero
        if cond and self._len == 0:
            # A frozen run starts at the window whose value is being repeated.
            self._run_start = self._prev_start if frozen else s.start_ns
        self._len = self._len + 1 if cond else 0
        self._prev = value
        self._prev_start = s.start_ns
        evidence: Evidence = {"value_w": value, "ref_w": ref, "mode": "zero" if zero else "frozen",
                              "windows": float(self._len + (0 if zero else 1))}
        return self.ep.step(cond, s, "critical", evidence, self._run_start)


def excursion(prev: float, cur: float, nxt: float, floor_w: float) -> float:
    """How far ``cur`` lies outside [min, max] of its neighbours, relative to their level.

    A load step lies between its neighbours (it is part way through the step) and scores 0.
    """
    lo, hi = (prev, nxt) if prev <= nxt else (nxt, prev)
    if cur > hi:
        return (cur - hi) / (hi + floor_w)
    if cur < lo:
        return (lo - cur) / (hi + floor_w)
    return 0.0


class SpikeDetector:
    """One window far outside both neighbours on one meter while the other meter stays put.

    Judged one window late (it needs the next window), so the event is opened and closed in
    one message.
    """

    def __init__(self, stream: str, channel: str, th: SpikeThresholds) -> None:
        self.th = th
        self.stream = stream
        self.channel = channel
        self._win: deque[tuple[Sample, float, float]] = deque(maxlen=3)

    def reset(self) -> None:
        self._win.clear()

    def update(self, s: Sample, value: float, ref: float) -> AnomalyEvent | None:
        if math.isnan(value):
            self._win.clear()
            return None
        self._win.append((s, value, ref))
        if len(self._win) < 3:
            return None
        return self.judge(self._win[0], self._win[1], self._win[2])

    def judge(self, prev: tuple[Sample, float, float], cur: tuple[Sample, float, float],
              nxt: tuple[Sample, float, float]) -> AnomalyEvent | None:
        rel = excursion(prev[1], cur[1], nxt[1], self.th.floor_w)
        if rel <= self.th.rel:
            return None
        ref_rel = 0.0
        if not (math.isnan(prev[2]) or math.isnan(cur[2]) or math.isnan(nxt[2])):
            ref_rel = excursion(prev[2], cur[2], nxt[2], self.th.floor_w)
        if ref_rel >= self.th.ref_rel:
            return None  # both meters saw it: a real, brief load
        s = cur[0]
        evidence: Evidence = {"value_w": cur[1], "prev_w": prev[1], "next_w": nxt[1],
                              "ref_w": cur[2], "excursion": rel}
        return AnomalyEvent("meter_spike", self.stream, self.channel, s.start_ns,
                            nxt[0].end_ns, "info", evidence, end_ns=s.end_ns)


class DriftDetector:
    """The running median of (main - check) / check leaving its calibrated bias.

    A median over ``span_windows`` ignores spikes and the one-window mismatch a load step makes
    when the two meters sample a fraction of a second apart.
    """

    def __init__(self, stream: str, th: DriftThresholds) -> None:
        self.th = th
        self.ep = Episode("meter_drift", stream, "main/check", Latch(2, th.clear_windows))
        self._ratios: deque[float] = deque(maxlen=th.span_windows)

    def reset(self, end_ns: int) -> AnomalyEvent | None:
        self._ratios.clear()
        return self.ep.abandon(end_ns)

    def update(self, s: Sample) -> AnomalyEvent | None:
        main, check = s.main_w, s.check_w
        if math.isnan(main) or math.isnan(check) or check < self.th.min_load_w:
            return None
        self._ratios.append((main - check) / check)
        if len(self._ratios) < self.th.span_windows:
            return None
        dev = _median(self._ratios) - self.th.bias
        cond: bool | None = None
        if abs(dev) > self.th.rel:
            cond = True
        elif abs(dev) < self.th.clear_rel:
            cond = False
        severity: Severity = "critical" if abs(dev) > 0.05 else "warning"
        evidence: Evidence = {"deviation_pct": 100.0 * dev, "bias_pct": 100.0 * self.th.bias,
                              "main_w": main, "check_w": check}
        return self.ep.step(cond, s, severity, evidence)


def _median(values: deque[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
