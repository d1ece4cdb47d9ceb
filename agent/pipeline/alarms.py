"""The anomaly stage: the typed detectors of ``agent.anomaly`` on the streams that ask for them.

One ``AnomalyMonitor`` per stream with a ``[streams.anomaly]`` table, fed every closed window of
that stream in order. Each transition (a fault opening, or clearing) becomes one message body
for ``anomaly/{stream}``. Monitors live as long as the generation: a reload starts them afresh,
so a fault still present is reported again as a new episode (the detectors need a few windows
of history, which a restart does not keep).
"""

from __future__ import annotations

from typing import Any

from agent.anomaly.monitor import AnomalyMonitor
from agent.anomaly.sample import ChannelMap, SiteInfo
from agent.anomaly.thresholds import load_thresholds
from agent.config.schema import AgentConfig, AnomalyConfig
from agent.readings import Window


def channel_map(a: AnomalyConfig) -> ChannelMap:
    return ChannelMap(main=a.main, lights=a.lights, check=a.check or None,
                      chargers=tuple(a.chargers), photocell=a.photocell or None)


class AnomalyStage:
    def __init__(self, cfg: AgentConfig) -> None:
        gw = cfg.gateway
        self._monitors: dict[str, tuple[AnomalyMonitor, ChannelMap]] = {}
        self.events = 0
        if gw.latitude is None or gw.longitude is None:
            return  # the config check refuses an anomaly table without them
        self.site = SiteInfo(gw.latitude, gw.longitude, gw.timezone)
        for st in cfg.streams:
            if st.anomaly is not None:
                monitor = AnomalyMonitor(st.name, load_thresholds(st.anomaly.thresholds))
                self._monitors[st.name] = (monitor, channel_map(st.anomaly))

    @property
    def streams(self) -> list[str]:
        return list(self._monitors)

    def on_window(self, w: Window) -> list[dict[str, Any]]:
        """The event transitions of this window, as ``anomaly/{stream}`` message bodies."""
        entry = self._monitors.get(w.stream)
        if entry is None:
            return []
        monitor, channels = entry
        out = [ev.to_message() for ev in monitor.on_window(w, channels, self.site)]
        self.events += len(out)
        return out

    def status(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "open": {name: [ev.to_message() for ev in m.open_events()]
                     for name, (m, _) in self._monitors.items()},
        }
