"""The Sparkplug edge node on the wire: its own MQTT connection (client id
``{gateway}-sparkplug``) to the ``[mqtt]`` broker, births on every connection, DDATA per
device at most every ``interval_s``, rebirth on command, historical replay after an outage.

QoS follows the specification: births and data at QoS 0, the NDEATH will at QoS 1, not
retained. Data kept while the broker is away goes to a bounded SQLite backlog
(``agent.sparkplug.backlog``) that survives restarts; a row is deleted once its DDATA is
written to the connection (QoS 0 has no acknowledgement to wait for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from agent.config.schema import MqttConfig
from agent.config.services import SparkplugConfig
from agent.readings import Reading
from agent.sparkplug.backlog import Backlog
from agent.sparkplug.codec import DataType, SparkplugDecodeError, decode
from agent.sparkplug.node import REBIRTH, EdgeNode, Outgoing
from agent.uplink.backoff import Backoff
from agent.uplink.connection import Link, LinkError
from agent.uplink.connector import Connector
from agent.uplink.tls import UplinkConfigError

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 10.0
DEATH_TIMEOUT_S = 2.0
PENDING_MAX = 10_000  # readings waiting for the next tick, all devices together
METRICS_PER_DDATA = 500
REPLAY_YIELD = 50  # historical messages sent between two yields to the event loop


def load_bd_seq(path: Path) -> int:
    """The bdSeq of the last connection (0-255); 0 when unknown or unreadable."""
    try:
        value = int(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.warning("sparkplug: %s unreadable (%s): bdSeq starts again at 0", path,
                    type(exc).__name__)
        return 0
    return value % 256


def save_bd_seq(path: Path, value: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(f"{value}\n", encoding="ascii")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("sparkplug: cannot keep bdSeq in %s: %s", path, exc)


class SparkplugSession:
    def __init__(self, cfg: SparkplugConfig, mqtt: MqttConfig, gateway: str, version: str,
                 state_dir: Path) -> None:
        self.cfg = cfg
        self.state_path = state_dir / "sparkplug.bdseq"
        self.node = EdgeNode(cfg.group_id, cfg.node_id or gateway, version,
                             load_bd_seq(self.state_path))
        self.connector = Connector(mqtt, gateway, will_topic=self.node.topic("NDEATH"),
                                   will=self._will, will_retain=False,
                                   client_id=f"{gateway}-sparkplug")
        self.backoff = Backoff(mqtt.reconnect_max_s)
        self._pending: deque[Reading] = deque()
        self.backlog = Backlog(state_dir / "sparkplug-backlog.db", cfg.backlog_max)
        self._rebirth = asyncio.Event()
        self.state = "idle"
        self.last_error = ""
        self.counts = {"births": 0, "rebirths": 0, "data": 0, "historical": 0,
                       "pending_dropped": 0, "bad_commands": 0,
                       "connects": 0}

    def _will(self) -> bytes:
        payload = self.node.new_session()
        save_bd_seq(self.state_path, self.node.bd_seq)
        return payload

    # -- from the pipeline ------------------------------------------------------------------

    def on_reading(self, r: Reading) -> None:
        if len(self._pending) >= PENDING_MAX:
            self._pending.popleft()
            self.counts["pending_dropped"] += 1
        self._pending.append(r)

    def _take(self) -> list[tuple[str, list[Reading]]]:
        """The pending readings by device, in chunks of at most ``METRICS_PER_DDATA`` (a
        long interval or a fast sensor must not make one payload the broker refuses)."""
        by_device: dict[str, list[Reading]] = {}
        while self._pending:
            r = self._pending.popleft()
            by_device.setdefault(r.sensor, []).append(r)
        return [(device, readings[i:i + METRICS_PER_DDATA])
                for device, readings in by_device.items()
                for i in range(0, len(readings), METRICS_PER_DDATA)]

    def _stash(self) -> None:
        """Offline: this tick's readings go to the backlog (their quantities are learned, so
        the births after the outage name them)."""
        for device, readings in self._take():
            self.node.learn(readings)
            self.backlog.append(device, readings)

    # -- the session ------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, publish, reconnect with jittered backoff; forever, until cancelled."""
        try:
            while True:
                self.state = "connecting"
                try:
                    async with self.connector.connect() as link:
                        await self._online(link)
                except UplinkConfigError as exc:
                    self._fail(str(exc))
                except (LinkError, OSError) as exc:
                    self._fail(str(exc) or type(exc).__name__)
                self.state = "waiting"
                await self._offline_for(self.backoff.next_delay())
        finally:
            self.state = "stopped"
            self._stash()  # what a stop caught pending is sent, as historical, next time
            self.backlog.close()

    def _fail(self, text: str) -> None:
        if text != self.last_error:
            log.warning("sparkplug: %s", text)
        self.last_error = text

    async def _offline_for(self, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        while True:
            self._stash()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, self.cfg.interval_s))

    def _send(self, link: Link, out: Outgoing) -> None:
        link.publish(out.topic, out.payload, qos=0)
        if out.kind in ("NBIRTH", "DBIRTH"):
            self.counts["births"] += 1

    async def _online(self, link: Link) -> None:
        self.counts["connects"] += 1
        await link.subscribe(self.node.topic("NCMD"), SUBSCRIBE_TIMEOUT_S)
        self.state = "connected"
        self.backoff.reset()
        self.last_error = ""
        self._rebirth.clear()
        commands = asyncio.create_task(self._commands(link), name="sparkplug-commands")
        try:
            for out in self.node.births():
                self._send(link, out)
            await self._replay(link)
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rebirth.wait(), self.cfg.interval_s)
                if commands.done():
                    commands.result()  # the connection is gone: raise its error
                if self._rebirth.is_set():
                    self._rebirth.clear()
                    self.counts["rebirths"] += 1
                    for out in self.node.births():
                        self._send(link, out)
                self._publish(link)
        finally:
            commands.cancel()
            await asyncio.gather(commands, return_exceptions=True)
            if link.lost is None:  # a stop, not an outage: say goodbye with the will's words
                death = self.node.death()
                with contextlib.suppress(LinkError, TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(link.publish(death.topic, death.payload, qos=1),
                                           DEATH_TIMEOUT_S)

    def _publish(self, link: Link) -> None:
        taken = self._take()
        while taken:
            device, readings = taken[0]
            try:
                for grown in self.node.learn(readings):
                    self._send(link, self.node.device_birth(grown))
                self._send(link, self.node.data(device, readings, historical=False))
            except LinkError:
                # Not sent: kept, and replayed as historical after the next session's births.
                for device_readings in taken:
                    self.backlog.append(*device_readings)
                raise
            self.counts["data"] += 1
            taken.pop(0)

    async def _replay(self, link: Link) -> None:
        """The backlog, oldest first, as historical DDATA; the births name every device in
        it (its quantities were learned when it was stored, or are learned here after a
        restart, with a DBIRTH first)."""
        while rows := self.backlog.oldest(REPLAY_YIELD):
            sent: list[int] = []
            try:
                for row_id, device, readings in rows:
                    for grown in self.node.learn(readings):
                        self._send(link, self.node.device_birth(grown))
                    self._send(link, self.node.data(device, readings, historical=True))
                    sent.append(row_id)
                    self.counts["historical"] += 1
            finally:
                self.backlog.remove(sent)
            await asyncio.sleep(0)

    async def _commands(self, link: Link) -> None:
        async for msg in link.messages:
            try:
                payload = decode(msg.payload)
            except SparkplugDecodeError as exc:
                self.counts["bad_commands"] += 1
                log.debug("sparkplug: NCMD on %s ignored: %s", msg.topic, exc)
                continue
            for m in payload.metrics:
                if m.name == REBIRTH and m.value is True and m.datatype in (
                        DataType.BOOLEAN, None):
                    log.info("sparkplug: rebirth requested")
                    self._rebirth.set()

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "group_id": self.node.group, "node_id": self.node.node,
                "bd_seq": self.node.bd_seq, "devices": sorted(self.node.units),
                "backlog": len(self.backlog), "pending": len(self._pending),
                "backlog_dropped": self.backlog.dropped,
                "backlog_unreadable": self.backlog.unreadable,
                "last_error": self.last_error, **self.counts}
