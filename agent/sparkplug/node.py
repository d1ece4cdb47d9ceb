"""The edge node's side of Sparkplug B 3.0, without I/O: topics, births, deaths, seq, bdSeq,
data and historical replay. ``agent.sparkplug.session`` puts it on the wire.

Rules kept here (specification section in brackets):

- Topics are ``spBv1.0/{group}/{NBIRTH|NDEATH|NDATA|NCMD}/{node}`` and
  ``spBv1.0/{group}/{DBIRTH|DDATA}/{node}/{device}`` [4.1]. Each sensor is a device.
- ``bdSeq`` (Int64) goes in the MQTT will (the NDEATH) of a connection and in the NBIRTH that
  follows it; it grows by one per connection, 0-255, and survives restarts [5.2, 6.4.21].
- ``seq`` is 0 in the NBIRTH and grows by one per message after it (DBIRTH, DDATA), wrapping
  from 255 to 0; an NDEATH has none [6.4.20].
- The NBIRTH lists every node metric with its datatype (``bdSeq``, ``Node Control/Rebirth``);
  a DBIRTH lists every metric of its device; DATA carries only metrics that were born [6.4.18].
  A quantity a sensor reports for the first time is born in a new DBIRTH before its data.
- ``Node Control/Rebirth`` = true in an NCMD asks for NBIRTH and every DBIRTH again [6.4.22].
- Data stored while the broker was away is sent after the births with ``is_historical`` set
  on every metric and the time it was measured [10: store and forward].
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from agent.readings import Reading
from agent.sparkplug.codec import DataType, Metric, Payload, Value, encode

NAMESPACE = "spBv1.0"
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
VERSION = "Node Info/Agent Version"
# Sparkplug's quality codes (OPC style), sent as the "Quality" property of a data metric.
QUALITY = {"good": 192, "suspect": 64, "bad": 0}


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    kind: str  # NBIRTH, DBIRTH, DDATA, NDEATH
    device: str = ""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class EdgeNode:
    def __init__(self, group: str, node: str, version: str, bd_seq: int = 0) -> None:
        self.group = group
        self.node = node
        self.version = version
        self.bd_seq = bd_seq % 256
        self._seq = 0
        self.units: dict[str, dict[str, str]] = {}  # device -> quantity -> unit
        self.last: dict[str, dict[str, Reading]] = {}  # device -> quantity -> last reading

    def topic(self, kind: str, device: str = "") -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.node}"
        return f"{base}/{device}" if device else base

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        return seq

    # -- per connection ---------------------------------------------------------------------

    def new_session(self) -> bytes:
        """Advance bdSeq for a new connection; return the NDEATH for its will."""
        self.bd_seq = (self.bd_seq + 1) % 256
        return self.death().payload

    def death(self) -> Outgoing:
        p = Payload([Metric(BDSEQ, DataType.INT64, self.bd_seq)], timestamp=now_ms())
        return Outgoing(self.topic("NDEATH"), encode(p), "NDEATH")

    def births(self) -> list[Outgoing]:
        """NBIRTH (seq 0) and a DBIRTH per known device: on connect and on rebirth."""
        self._seq = 0
        ts = now_ms()
        node = Payload([Metric(BDSEQ, DataType.INT64, self.bd_seq, ts),
                        Metric(REBIRTH, DataType.BOOLEAN, False, ts),
                        Metric(VERSION, DataType.STRING, self.version, ts)],
                       timestamp=ts, seq=self._next_seq())
        out = [Outgoing(self.topic("NBIRTH"), encode(node), "NBIRTH")]
        out += [self.device_birth(device) for device in sorted(self.units)]
        return out

    def device_birth(self, device: str) -> Outgoing:
        ts = now_ms()
        metrics = []
        for quantity, unit in sorted(self.units[device].items()):
            last = self.last.get(device, {}).get(quantity)
            metrics.append(Metric(quantity, DataType.DOUBLE,
                                  last.value if last is not None else None,
                                  last.ts_ns // 1_000_000 if last is not None else ts,
                                  properties={"engUnit": (DataType.STRING, unit)}))
        p = Payload(metrics, timestamp=ts, seq=self._next_seq())
        return Outgoing(self.topic("DBIRTH", device), encode(p), "DBIRTH", device)

    # -- data -------------------------------------------------------------------------------

    def learn(self, readings: Iterable[Reading]) -> list[str]:
        """Record the readings' quantities; return the devices that gained a metric (they
        need a DBIRTH before their next data)."""
        grown: list[str] = []
        for r in readings:
            units = self.units.setdefault(r.sensor, {})
            if r.quantity not in units:
                units[r.quantity] = r.unit
                if r.sensor not in grown:
                    grown.append(r.sensor)
            self.last.setdefault(r.sensor, {})[r.quantity] = r
        return grown

    def data(self, device: str, readings: list[Reading], *, historical: bool) -> Outgoing:
        """One DDATA with every reading (each at its own time), in order."""
        metrics = []
        for r in readings:
            props: dict[str, tuple[DataType, Value]] = (
                {} if r.quality == "good"
                else {"Quality": (DataType.INT32, QUALITY.get(r.quality, 0))})
            metrics.append(Metric(r.quantity, DataType.DOUBLE, r.value, r.ts_ns // 1_000_000,
                                  is_historical=historical, properties=props))
        p = Payload(metrics, timestamp=now_ms(), seq=self._next_seq())
        return Outgoing(self.topic("DDATA", device), encode(p), "DDATA", device)
