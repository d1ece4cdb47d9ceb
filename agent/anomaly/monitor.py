"""All detectors of one cabinet over one energy stream, and how they defer to each other.

A stuck feed meter makes every comparison that uses it meaningless: while one is open, drift
is not judged (and its history is dropped on both edges, so it does not carry stuck windows
over), that meter's spikes are not judged, and the unexplained-load residual uses the other
meter only.
"""

from __future__ import annotations

from agent.anomaly.events import AnomalyEvent
from agent.anomaly.loads import LampDetector, UnexplainedLoadDetector
from agent.anomaly.meters import DriftDetector, SpikeDetector, StuckDetector
from agent.anomaly.sample import ChannelMap, Sample, SiteInfo, sample_from_window
from agent.anomaly.thresholds import Thresholds
from agent.readings import Window


class AnomalyMonitor:
    """Feed it one ``Sample`` (or ``Window``) per stream window, in order.

    ``update`` returns the transitions of that window: an event with ``end_ns is None`` has just
    opened, one with ``end_ns`` set has just closed (a spike opens and closes at once). Publish
    each on ``anomaly/{stream}``; ``open_events`` is the current state, e.g. for a status view.
    """

    def __init__(self, stream: str, thresholds: Thresholds) -> None:
        self.stream = stream
        self.thresholds = th = thresholds
        self.stuck = {m: StuckDetector(stream, m, th.stuck) for m in ("main", "check")}
        self.spike = {m: SpikeDetector(stream, m, th.spike) for m in ("main", "check")}
        self.drift = DriftDetector(stream, th.drift)
        self.lamps = LampDetector(stream, th.lamps)
        self.unexplained = UnexplainedLoadDetector(stream, th.unexplained)
        self._open: dict[str, AnomalyEvent] = {}

    def on_window(self, window: Window, channels: ChannelMap, site: SiteInfo) -> list[AnomalyEvent]:
        return self.update(sample_from_window(window, channels, site))

    def open_events(self) -> list[AnomalyEvent]:
        return list(self._open.values())

    def update(self, s: Sample) -> list[AnomalyEvent]:
        out: list[AnomalyEvent] = []
        values = {"main": (s.main_w, s.check_w), "check": (s.check_w, s.main_w)}
        stuck_before = any(d.is_open for d in self.stuck.values())
        for m, det in self.stuck.items():
            ev = det.update(s, *values[m])
            if ev is not None:
                out.append(ev)
        stuck_now = {m for m, d in self.stuck.items() if d.is_open}
        if stuck_now or stuck_before:
            ev = self.drift.reset(s.end_ns)
            if ev is not None:
                out.append(ev)
        else:
            ev = self.drift.update(s)
            if ev is not None:
                out.append(ev)
        for m, spike in self.spike.items():
            if m in stuck_now:
                spike.reset()
                continue
            ev = spike.update(s, *values[m])
            if ev is not None:
                out.append(ev)
        out.extend(self.lamps.update(s))
        ev = self.unexplained.update(s, "main" not in stuck_now, "check" not in stuck_now)
        if ev is not None:
            out.append(ev)
        for ev in out:
            if ev.end_ns is None:
                self._open[ev.event_id] = ev
            else:
                self._open.pop(ev.event_id, None)
        return out
