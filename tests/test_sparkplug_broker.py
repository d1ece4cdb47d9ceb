"""The Sparkplug edge node through a real mosquitto, watched by the independent decoder:
births before data, seq wrapping at 255, rebirth on NCMD, NDEATH with the matching bdSeq on
kill -9, and the backlog of a broker outage replayed as historical."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.control.view import render_text
from agent.sparkplug.codec import DataType
from agent.sparkplug.node import BDSEQ, REBIRTH
from tests import sparkplug_oracle as oracle
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, start_agent_process, write_toml
from tests.waiting import until

pytestmark = pytest.mark.slow

GROUP = "plant"
NODE = "gw-test"
DEVICES = {"env", "lights", "air"}


def sensors(env_period_s: float) -> list[dict[str, Any]]:
    return [
        {"name": "env", "driver": "bme280", "bus": "emulated", "address": 0x76,
         "period_s": env_period_s},
        {"name": "lights", "driver": "pzem004t", "port": "emulated", "address": 1,
         "period_s": 0.2, "options": {"emulator": {"profile": "street_lighting"}}},
        {"name": "air", "driver": "pms5003", "port": "emulated", "period_s": 1.0},
    ]


def spb_config(tmp: Path, port: int, *, interval_s: float, env_period_s: float) -> dict[str, Any]:
    return make_config(
        tmp, port, sensors=sensors(env_period_s),
        streams=[{"name": "all", "sensors": sorted(DEVICES), "window_s": 5}],
        sparkplug={"enabled": True, "group_id": GROUP, "interval_s": interval_s})


@dataclass
class Seen:
    kind: str
    device: str
    payload: Any
    at: float


@dataclass
class Host:
    """A Sparkplug host's view: every message under the group, decoded by protoc's code."""

    broker: Mosquitto
    persistent: bool = False
    seen: list[Seen] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port,
                                          identifier="scada-host", timeout=3,
                                          clean_session=not self.persistent,
                                          protocol=aiomqtt.ProtocolVersion.V311) as c:
                    c.pending_calls_threshold = 100_000
                    await c.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
                    self.connected.set()
                    async for m in c.messages:
                        parts = str(m.topic).split("/")
                        if parts[2] in ("NCMD", "DCMD"):
                            continue  # our own commands (one is garbage on purpose)
                        assert isinstance(m.payload, bytes)
                        self.seen.append(Seen(parts[2], parts[4] if len(parts) > 4 else "",
                                              oracle.parse(m.payload), time.time()))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    def kinds(self, *kinds: str) -> list[Seen]:
        return [s for s in self.seen if s.kind in kinds]

    async def command(self, payload: bytes) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port,
                                  identifier="scada-cmd") as c:
            await c.publish(f"spBv1.0/{GROUP}/NCMD/{NODE}", payload, qos=1)


@contextlib.asynccontextmanager
async def host(broker: Mosquitto, persistent: bool = False) -> AsyncIterator[Host]:
    h = Host(broker, persistent)
    task = asyncio.create_task(h.follow(), name="scada-host")
    try:
        await asyncio.wait_for(h.connected.wait(), 10)
        yield h
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def bd_seq(s: Seen) -> int:
    return int(oracle.value(oracle.by_name(s.payload)[BDSEQ]))


def check_order(seen: list[Seen]) -> None:
    """From an NBIRTH on: seq 0 at the NBIRTH, +1 mod 256 per message, each device born
    before its data."""
    born: set[str] = set()
    expected = None
    for s in seen:
        if s.kind == "NDEATH":
            continue
        if s.kind == "NBIRTH":
            assert s.payload.seq == 0
            born = set()
        else:
            assert s.payload.seq == expected, (s.kind, s.device, s.payload.seq, expected)
        if s.kind == "DBIRTH":
            born.add(s.device)
        if s.kind == "DDATA":
            assert s.device in born, f"DDATA of {s.device} before its DBIRTH"
            assert all(m.datatype == DataType.DOUBLE for m in s.payload.metrics)
        expected = (s.payload.seq + 1) % 256


async def test_births_seq_wrap_rebirth_and_death(tmp_path: Path, broker: Mosquitto) -> None:
    cfg = write_toml(tmp_path / "agent.toml",
                     spb_config(tmp_path, broker.port, interval_s=0.01, env_period_s=0.01))
    async with host(broker) as h:
        proc = start_agent_process(cfg, log=tmp_path / "agent.log")
        try:
            await until(lambda: len(h.kinds("DDATA")) > 300, 60, "300 DDATA messages")
            first = h.seen[0]
            assert first.kind == "NBIRTH" and first.payload.seq == 0
            births = h.kinds("DBIRTH")
            assert {s.device for s in births} >= {"env", "lights"}
            nbirth_metrics = oracle.by_name(first.payload)
            assert nbirth_metrics[REBIRTH].datatype == DataType.BOOLEAN
            assert nbirth_metrics[BDSEQ].datatype == DataType.INT64
            bd = bd_seq(first)
            wraps = [i for i, (a, b) in enumerate(zip(h.seen, h.seen[1:], strict=False))
                     if a.payload.seq == 255 and b.payload.seq == 0 and b.kind != "NBIRTH"]
            assert wraps, "seq never wrapped from 255 to 0"
            check_order(h.seen)

            # Rebirth on request: NBIRTH (seq 0, same bdSeq) and every DBIRTH again.
            cmd = oracle.Payload()
            cmd.timestamp = int(time.time() * 1000)
            m = cmd.metrics.add()
            m.name = REBIRTH
            m.datatype = DataType.BOOLEAN
            m.boolean_value = True
            await h.command(b"\x00garbage that is not a payload")
            await h.command(cmd.SerializeToString())
            await until(lambda: len(h.kinds("NBIRTH")) >= 2, 20, "a second NBIRTH")
            reborn = h.kinds("NBIRTH")[1]
            assert reborn.payload.seq == 0 and bd_seq(reborn) == bd
            at = h.seen.index(reborn)
            await until(lambda: {s.device for s in h.seen[at:] if s.kind == "DBIRTH"} == DEVICES,
                        20, "DBIRTH of every device after the rebirth")
            check_order(h.seen)
            assert not any(s.kind == "NDEATH" for s in h.seen)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        # The broker sends the will: the NDEATH names the bdSeq of the births.
        await until(lambda: bool(h.kinds("NDEATH")), 20, "the NDEATH will")
        death = h.kinds("NDEATH")[0]
        assert bd_seq(death) == bd
        assert not death.payload.HasField("seq")


async def test_outage_backlog_arrives_historical(tmp_path: Path) -> None:
    # QoS 0 data reaches a persistent host session that was offline only if the broker queues
    # QoS 0 for it; the host is not what is under test.
    broker = Mosquitto(tmp_path / "mosq", extra_conf="queue_qos0_messages true\n")
    broker.start()
    try:
        cfg = spb_config(tmp_path, broker.port, interval_s=0.2, env_period_s=0.2)
        cfg["mqtt"]["reconnect_max_s"] = 1.0
        async with host(broker, persistent=True) as h:
            async with running_agent(cfg) as agent:
                spb = agent.sparkplug
                assert spb is not None
                await until(lambda: any(s.device == "env" for s in h.kinds("DDATA")), 20,
                            "live DDATA")
                first_bd = bd_seq(h.kinds("NBIRTH")[0])
                broker.stop()
                t_down = time.time() * 1000
                await until(lambda: spb.state != "connected", 20, "the node to see the outage")
                await until(lambda: len(spb.backlog) >= 10, 30, "a backlog")
                t_up = time.time() * 1000
                broker.start()
                await until(lambda: len(h.kinds("NBIRTH")) >= 2, 30, "births after the outage")
                await until(lambda: any(m.is_historical for s in h.kinds("DDATA")
                                        for m in s.payload.metrics), 30, "historical data")
                await until(lambda: not spb.backlog, 30, "the backlog replayed")
                await until(lambda: any(not s.payload.metrics[0].is_historical
                                        for s in h.seen[h.seen.index(h.kinds("NBIRTH")[-1]):]
                                        if s.kind == "DDATA"), 30, "live data again")
                line = next(ln for ln in render_text(agent.snapshot()).splitlines()
                            if ln.startswith("sparkplug "))
                assert line.startswith(f"sparkplug connected {GROUP}/{NODE}, bdSeq ")
            # A clean stop says goodbye with the will's words: NDEATH with the births' bdSeq.
            last_bd = bd_seq(h.kinds("NBIRTH")[-1])
            await until(lambda: any(bd_seq(s) == last_bd for s in h.kinds("NDEATH")), 20,
                        "the NDEATH of a clean stop")
        seen = h.seen
        second = [i for i, s in enumerate(seen) if s.kind == "NBIRTH"][-1]
        assert bd_seq(seen[second]) != first_bd  # a new connection, a new bdSeq
        before, after = seen[:second], seen[second:]
        assert not any(m.is_historical for s in before for m in s.payload.metrics)
        historical = [s for s in after if s.kind == "DDATA"
                      and any(m.is_historical for m in s.payload.metrics)]
        assert len(historical) >= 10
        for s in historical:
            assert all(m.is_historical for m in s.payload.metrics)
            assert all(t_down - 2000 <= m.timestamp <= t_up + 1000 for m in s.payload.metrics)
        # The births come first after the reconnect, then the history, then live data.
        first_hist = after.index(historical[0])
        assert {s.device for s in after[:first_hist] if s.kind == "DBIRTH"} == DEVICES
        live = [i for i, s in enumerate(after) if s.kind == "DDATA"
                and not s.payload.metrics[0].is_historical]
        assert live and live[0] > after.index(historical[-1])
        check_order(after)
        assert spb.counts["historical"] >= 10 and spb.status()["backlog_dropped"] == 0
    finally:
        broker.stop()


async def test_backlog_survives_kill_9_during_an_outage(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosq", extra_conf="queue_qos0_messages true\n")
    broker.start()
    data = spb_config(tmp_path, broker.port, interval_s=0.2, env_period_s=0.2)
    data["mqtt"]["reconnect_max_s"] = 1.0
    cfg = write_toml(tmp_path / "agent.toml", data)
    backlog_db = tmp_path / "sparkplug-backlog.db"

    def stored() -> int:
        try:
            with contextlib.closing(sqlite3.connect(backlog_db)) as db:
                return int(db.execute("SELECT count(*) FROM backlog").fetchone()[0])
        except sqlite3.Error:
            return 0

    try:
        async with host(broker, persistent=True) as h:
            proc = start_agent_process(cfg, log=tmp_path / "agent-1.log")
            try:
                await until(lambda: bool(h.kinds("DDATA")), 30, "live DDATA")
                first_bd = bd_seq(h.kinds("NBIRTH")[0])
                broker.stop()
                t_down = time.time() * 1000
                await until(lambda: stored() >= 10, 30, "rows in the backlog file")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            kept = stored()
            t_killed = time.time() * 1000
            broker.start()
            proc = start_agent_process(cfg, log=tmp_path / "agent-2.log")
            try:
                await until(lambda: len([s for s in h.kinds("DDATA") if s.at * 1000 > t_killed
                                         and s.payload.metrics[0].is_historical]) >= kept,
                            30, "the stored rows, historical")
                await until(lambda: stored() == 0, 30, "the backlog emptied")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
        after = [s for s in h.seen if s.at * 1000 > t_killed]
        births = [s for s in after if s.kind == "NBIRTH"]
        assert births and bd_seq(births[0]) != first_bd  # bdSeq went on across the restart
        historical = [s for s in after if s.kind == "DDATA"
                      and s.payload.metrics[0].is_historical]
        for s in historical:
            assert all(m.is_historical and t_down - 2000 <= m.timestamp <= t_killed
                       for m in s.payload.metrics)
        start = after.index(births[0])
        check_order(after[start:])
    finally:
        broker.stop()
