"""Prometheus text exposition (format 0.0.4) and OpenMetrics 1.0 of the agent's snapshot.

Written by hand rather than with ``prometheus_client``: every value already lives in the
agent's snapshot, so a registry of collectors kept in step with it would hold a second copy
of the same state; the format is a few rules (escaping, ``_total`` on counters, ``# EOF``).
The tests parse this output with ``prometheus_client``'s parsers (dev extra) and scrape it with
a real Prometheus.

Names follow Prometheus's conventions: one ``edge_agent_`` prefix, base units in the name
(``_seconds``, ``_bytes``), ``_total`` on counters, labels for the dimension (sensor, channel,
class, model) rather than in the name.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

Kind = Literal["gauge", "counter"]


@dataclass
class Family:
    name: str
    kind: Kind
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: Any, **labels: Any) -> None:
        """Add a sample; a value that is not a finite number (None, unset) is left out."""
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.samples.append(({k: str(v) for k, v in labels.items()}, float(value)))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def render(families: Iterable[Family], *, openmetrics: bool) -> bytes:
    out: list[str] = []
    for fam in families:
        base = fam.name.removesuffix("_total") if fam.kind == "counter" else fam.name
        sample_name = base + "_total" if fam.kind == "counter" else base
        declared = base if openmetrics else sample_name
        out.append(f"# HELP {declared} {fam.help}")
        out.append(f"# TYPE {declared} {fam.kind}")
        for labels, value in fam.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{sample_name}{{{text}}} {_number(value)}" if text
                       else f"{sample_name} {_number(value)}")
    if openmetrics:
        out.append("# EOF")
    return ("\n".join(out) + "\n").encode()


def wants_openmetrics(accept: str) -> bool:
    return "application/openmetrics-text" in accept


def families(snap: Mapping[str, Any]) -> list[Family]:
    """Every family from one agent snapshot (``Agent.snapshot()``)."""
    fams: dict[str, Family] = {}

    def fam(name: str, kind: Kind, help_text: str) -> Family:
        return fams.setdefault(name, Family(name, kind, help_text))

    agent = snap.get("agent", {})
    fam("edge_agent_build_info", "gauge", "Version of the running agent (always 1).").add(
        1, version=agent.get("version", ""), python=platform.python_version())
    fam("edge_agent_uptime_seconds", "gauge", "Seconds since the agent started.").add(
        agent.get("uptime_s"))
    fam("edge_agent_config_reloads_total", "counter", "Configuration reloads by result.")
    fams["edge_agent_config_reloads_total"].add(agent.get("reloads_ok"), result="ok")
    fams["edge_agent_config_reloads_total"].add(agent.get("reloads_rejected"), result="rejected")
    _sensors(snap, fam)
    _queues_outbox(snap, fam)
    _uplink(snap.get("uplink") or {}, fam)
    _models(snap.get("models") or {}, fam)
    if isinstance(spb := snap.get("sparkplug"), Mapping):
        fam("edge_agent_sparkplug_connected", "gauge",
            "1 while the Sparkplug edge node is connected.").add(spb.get("state") == "connected")
        fam("edge_agent_sparkplug_backlog_messages", "gauge",
            "DDATA payloads stored for historical replay.").add(spb.get("backlog"))
        dropped = fam("edge_agent_sparkplug_dropped_total", "counter",
                      "Sparkplug data dropped at a bound, by where.")
        dropped.add(spb.get("backlog_dropped"), where="backlog")
        dropped.add(spb.get("pending_dropped"), where="pending")
    return list(fams.values())


def _sensors(snap: Mapping[str, Any], fam: Any) -> None:
    up = fam("edge_agent_sensor_up", "gauge", "1 while the sensor delivers readings, else 0.")
    readings = fam("edge_agent_sensor_readings_total", "counter", "Readings from the sensor.")
    errors = fam("edge_agent_sensor_errors_total", "counter", "Failed reads or opens.")
    restarts = fam("edge_agent_sensor_restarts_total", "counter", "Sensor restarts.")
    for s in snap.get("sensors") or []:
        name, driver = s.get("name", ""), s.get("driver", "")
        up.add(s.get("state") == "up", sensor=name, driver=driver)
        readings.add(s.get("readings"), sensor=name)
        errors.add(s.get("failures"), sensor=name)
        restarts.add(s.get("restarts"), sensor=name)
    quality = fam("edge_agent_readings_quality_total", "counter",
                  "Cleaned readings by channel and quality (good, suspect, bad).")
    dropped = fam("edge_agent_readings_dropped_total", "counter",
                  "Readings the cleaner dropped, by channel and reason.")
    stale = fam("edge_agent_channel_stale", "gauge", "1 while the channel is stale.")
    for channel, c in (snap.get("clean") or {}).items():
        if not isinstance(c, Mapping):
            continue
        for q in ("good", "suspect", "bad"):
            quality.add(c.get(q), channel=channel, quality=q)
        for reason, n in (c.get("dropped") or {}).items():
            dropped.add(n, channel=channel, reason=reason)
        stale.add(c.get("stale"), channel=channel)


def _queues_outbox(snap: Mapping[str, Any], fam: Any) -> None:
    depth = fam("edge_agent_queue_depth", "gauge", "Items waiting in the queue.")
    qdrops = fam("edge_agent_queue_dropped_total", "counter", "Items the queue dropped.")
    for name, q in (snap.get("queues") or {}).items():
        depth.add(q.get("depth"), queue=name)
        qdrops.add(q.get("dropped"), queue=name)
    ob = snap.get("outbox") or {}
    rows = fam("edge_agent_outbox_rows", "gauge", "Messages stored in the outbox, by class.")
    size = fam("edge_agent_outbox_bytes", "gauge", "Payload bytes stored, by class.")
    drops = fam("edge_agent_outbox_dropped_total", "counter",
                "Messages the outbox dropped at its bound, by class.")
    for cls, n in (ob.get("depth") or {}).items():
        rows.add(n, **{"class": cls})
    for cls, n in (ob.get("bytes_by_class") or {}).items():
        size.add(n, **{"class": cls})
    for cls, n in (ob.get("drops") or {}).items():
        drops.add(n, **{"class": cls})
    fam("edge_agent_outbox_oldest_age_seconds", "gauge",
        "Age of the oldest stored message (absent when empty).").add(ob.get("oldest_age_s"))
    fam("edge_agent_outbox_quarantined_rows", "gauge",
        "Messages kept in quarantine.").add(ob.get("quarantine_rows"))
    fam("edge_agent_outbox_commit_errors_total", "counter",
        "Failed outbox commits.").add(ob.get("commit_errors"))


UPLINK_STATES = ("idle", "connecting", "connected", "disconnected", "waiting", "stopped")


def _uplink(up: Mapping[str, Any], fam: Any) -> None:
    state = fam("edge_agent_uplink_state", "gauge", "1 for the uplink's current state.")
    current = up.get("state")
    for s in UPLINK_STATES:
        state.add(s == current, state=s)
    fam("edge_agent_uplink_connected", "gauge", "1 while connected to the broker.").add(
        current == "connected")
    latency = up.get("puback_latency_ms")
    fam("edge_agent_uplink_puback_latency_seconds", "gauge",
        "Smoothed time from publish to the broker's PUBACK.").add(
        None if latency is None else latency / 1000)
    for key, help_text in (("reconnects", "Reconnections after a lost connection."),
                           ("connect_failures", "Failed connection attempts."),
                           ("published", "Messages published."),
                           ("acked", "Messages acknowledged by the broker."),
                           ("quarantined", "Messages quarantined after repeated refusal.")):
        fam(f"edge_agent_uplink_{key}_total", "counter", help_text).add(up.get(key))
    fam("edge_agent_uplink_inflight", "gauge", "Publishes awaiting PUBACK.").add(
        up.get("inflight"))


def _models(models: Mapping[str, Any], fam: Any) -> None:
    latency = fam("edge_agent_model_latency_seconds", "gauge", "Latency of the last run.")
    skill = fam("edge_agent_model_skill", "gauge",
                "Running skill against persistence (1 - model MAE / persistence MAE).")
    fallback = fam("edge_agent_model_fallback", "gauge",
                   "1 while persistence is published instead of the model.")
    runs = fam("edge_agent_model_runs_total", "counter", "Model runs.")
    failures = fam("edge_agent_model_failures_total", "counter", "Failed model runs.")
    for name, m in ((models.get("status") or {}).get("models") or {}).items():
        ms = m.get("last_latency_ms")
        latency.add(None if ms is None else ms / 1000, model=name)
        guard = m.get("guard") or {}
        skill.add(guard.get("skill"), model=name)
        fallback.add(guard.get("source") == "fallback", model=name)
        runs.add(m.get("runs"), model=name)
        failures.add(m.get("failures"), model=name)
