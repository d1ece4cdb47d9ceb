"""Typed anomaly detection for a street cabinet's energy stream.

Owns: the detectors (one per fault class: ``meter_stuck``, ``meter_spike``, ``meter_drift``,
``lamps_dark``, ``lamps_lit``, ``unexplained_load``), the events they raise, and the
calibration that sets their thresholds per site from a few weeks of history.

May import: ``agent.readings``, the standard library and numpy (calibration only; the per-window
path is plain Python). Calibration (``agent.anomaly.calibrate``: ``History``, ``calibrate``) is
not re-exported here, so that loading a config or running the detectors never imports numpy.
Nothing else in the agent, so it can be wired into any pipeline shape.

Runtime use::

    th = Thresholds.from_json(text)            # from the manifest or config
    mon = AnomalyMonitor("energy", th)
    for ev in mon.on_window(window, channels, site):
        publish(topic(prefix, gateway, ev.stream), ev.to_message())

Each fault is one event: a message when it opens (``end`` null) and one when it clears
(``end`` set), with the same ``event_id``. ``docs/anomalies.md`` says what each type means at
the cabinet.
"""

from __future__ import annotations

from agent.anomaly.events import EVENT_TYPES, AnomalyEvent, EventType, Severity, topic
from agent.anomaly.monitor import AnomalyMonitor
from agent.anomaly.sample import ChannelMap, Sample, SiteInfo, sample_from_window
from agent.anomaly.thresholds import Thresholds

__all__ = [
    "EVENT_TYPES",
    "AnomalyEvent",
    "AnomalyMonitor",
    "ChannelMap",
    "EventType",
    "Sample",
    "Severity",
    "SiteInfo",
    "Thresholds",
    "sample_from_window",
    "topic",
]
