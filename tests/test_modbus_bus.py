"""The generic modbus driver on a shared emulated RS-485 line and on Modbus TCP: every poll
made, every value exactly what the unit sent (pymodbus decodes the served registers as the
oracle), a silent unit stalling no one, faults counted and survived."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from pymodbus.client.mixin import ModbusClientMixin

from agent.config.schema import SensorConfig
from agent.readings import Reading
from agent.supervisor import SensorSupervisor
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady, ProtocolError
from drivers.emulated.modbus import ModbusRtuLine, ModbusTcpServer
from drivers.modbus.decode import physical
from drivers.modbus.profile import BIT_TABLES, ResolvedPoint
from drivers.modbus.sensor import ModbusSensor
from drivers.registry import build_sensor
from tests.waiting import until

RTU = (("sdm120", "eastron-sdm120", 1), ("sdm630", "eastron-sdm630", 2),
       ("pzem", "pzem-004t-v3", 3))
DT = ModbusClientMixin.DATATYPE
ORACLE_TYPES = {"u16": DT.UINT16, "i16": DT.INT16, "u32": DT.UINT32, "i32": DT.INT32,
                "u64": DT.UINT64, "i64": DT.INT64, "f32": DT.FLOAT32, "f64": DT.FLOAT64}


def oracle(p: ResolvedPoint, words: tuple[int, ...]) -> float:
    """pymodbus decodes the point's registers; pymodbus has no byte swap, so only ABCD/CDAB."""
    if p.table in BIT_TABLES or p.type == "bool":
        return float(bool(words[0]))
    assert p.order in ("ABCD", "CDAB")
    raw = ModbusClientMixin.convert_from_registers(
        list(words), ORACLE_TYPES[p.type], word_order="big" if p.order == "ABCD" else "little")
    assert isinstance(raw, (int, float))
    if p.bit is not None:
        raw = (int(raw) >> p.bit) & ((1 << p.width) - 1)
    return physical(raw, p.scale, p.offset, p.factor)


def modbus_cfg(name: str, profile: str, unit: int, transport: str = "rtu") -> SensorConfig:
    return SensorConfig(name=name, driver="modbus", port="emulated", address=unit,
                        period_s=1.0, timeout_s=0.2,
                        # One rate for every unit on the line (the SDM120 ships at 2400).
                        options={"profile": profile, "retries": 1, "baudrate": 9600,
                                 "emulator": {"bus": "rs485", "transport": transport}})


@dataclass
class Rig:
    sensors: dict[str, ModbusSensor]
    sups: dict[str, SensorSupervisor]
    out: dict[str, list[Reading]] = field(default_factory=dict)

    @property
    def line(self) -> ModbusRtuLine:
        line = self.sensors["sdm120"].emulator
        assert isinstance(line, ModbusRtuLine)
        return line

    @property
    def server(self) -> ModbusTcpServer:
        server = self.sensors["tcp"].emulator
        assert isinstance(server, ModbusTcpServer)
        return server

    def polls(self, name: str) -> list[list[Reading]]:
        n = sum(len(r.points) for r in self.sensors[name].requests)
        rs = self.out[name]
        return [rs[i:i + n] for i in range(0, len(rs) - n + 1, n)]


@contextlib.asynccontextmanager
async def rig(ctx: BuildContext) -> AsyncIterator[Rig]:
    cfgs = [modbus_cfg(n, p, u) for n, p, u in RTU]
    cfgs.append(modbus_cfg("tcp", "eastron-sdm630", 7, "tcp"))
    sensors: dict[str, ModbusSensor] = {}
    for c in cfgs:
        s = build_sensor(c, ctx)
        assert isinstance(s, ModbusSensor)
        sensors[c.name] = s
    r = Rig(sensors, {})
    for name, s in sensors.items():
        r.out[name] = []
        r.sups[name] = SensorSupervisor(
            name, "modbus", lambda s=s: s, r.out[name].append, backoff_initial_s=0.5,
            backoff_max_s=2.0, down_after=2, open_timeout_s=5.0, rng=random.Random(1))
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sup.run(), name=f"sup:{n}") for n, sup in r.sups.items()]
        try:
            yield r
        finally:
            for t in tasks:
                t.cancel()


def check_exact(r: Rig, name: str, served: list[tuple[int, int, int, int, tuple[int, ...]]]
                ) -> int:
    """Every reading of ``name`` equals pymodbus's decoding of what its unit served."""
    s = r.sensors[name]
    mine = [e for e in served if e[0] == s.unit]
    polls = r.polls(name)
    k = len(s.requests)
    assert len(mine) >= len(polls) * k
    checked = 0
    for i, poll in enumerate(polls):
        got = {x.quantity: x.value for x in poll}
        for j, req in enumerate(s.requests):
            unit, fc, start, count, values = mine[i * k + j]
            assert (unit, fc, start, count) == (s.unit, req.function, req.start, req.count)
            for p in req.points:
                off = p.address - start
                assert got[p.quantity] == oracle(p, values[off:off + p.span]), (name, p)
                checked += 1
    return checked


def assert_every_poll(r: Rig, name: str, seconds: float) -> None:
    starts = [poll[0].mono_ns for poll in r.polls(name)]
    assert len(starts) >= int(seconds), (name, len(starts))
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(starts)]
    assert max(gaps) < 1.5, (name, max(gaps))  # a missed 1 Hz poll shows as a 2 s gap


async def shared_bus(ctx: BuildContext, seconds: float) -> None:
    async with rig(ctx) as r:
        await until(lambda: all(len(r.polls(n)) >= seconds + 1 for n in r.sensors),
                    seconds + 15, "every sensor to make its polls")
        for name, sup in r.sups.items():
            assert sup.health.failures == 0, (name, sup.health.last_error)
            assert_every_poll(r, name, seconds)
        served = list(r.line.served)
        checked = sum(check_exact(r, n, served) for n, _, _ in RTU)
        checked += check_exact(r, "tcp", list(r.server.served))
        assert checked >= (13 + 28 + 7 + 28) * int(seconds)
        # The three RTU units really share one line and one port object.
        assert len({id(s.link) for n, s in r.sensors.items() if n != "tcp"}) == 1
        assert r.line.bad_requests == 0

        # One RTU unit goes silent: the other two still make every poll.
        r.line.units[2].vanish()
        before = {n: len(r.polls(n)) for n in r.sensors}
        quiet = max(4.0, seconds / 4)
        await until(lambda: all(len(r.polls(n)) - before[n] >= quiet + 1
                                for n in ("sdm120", "pzem", "tcp")), quiet + 15,
                    "the live units' polls")
        for name in ("sdm120", "pzem", "tcp"):
            r.out[name] = r.out[name][before[name] * len(r.polls(name)[0]):]
            assert_every_poll(r, name, quiet)
            assert r.sups[name].health.failures == 0
        assert r.sups["sdm630"].health.failures >= 1
        assert "no reply" in r.sups["sdm630"].health.last_error
        # ... and when it comes back, so do its readings.
        got = len(r.out["sdm630"])
        r.line.units[2].come_back()
        await until(lambda: len(r.out["sdm630"]) > got, 10, "the unit back on the line")


async def test_shared_rs485_line_and_tcp_every_poll_exact(ctx: BuildContext) -> None:
    await shared_bus(ctx, 4.0)


@pytest.mark.slow
async def test_shared_rs485_line_and_tcp_for_60_s(ctx: BuildContext) -> None:
    await shared_bus(ctx, 60.0)


async def one(ctx: BuildContext, profile: str = "eastron-sdm630",
              transport: str = "rtu") -> ModbusSensor:
    s = build_sensor(modbus_cfg("m", profile, 4, transport), ctx)
    assert isinstance(s, ModbusSensor)
    await s.open()
    return s


async def test_exception_and_crc_faults_are_retried_and_counted(ctx: BuildContext) -> None:
    s = await one(ctx)
    line = s.emulator
    assert isinstance(line, ModbusRtuLine)
    unit = line.units[4]
    unit.inject_exception(0x06)  # server busy: worth a retry
    assert len(await s.sample()) == 28
    assert s.counters["exception_replies"] == 1 and s.counters["retries"] == 1
    unit.inject_corrupt(1)
    assert len(await s.sample()) == 28
    assert s.counters["crc_errors"] >= 1 and s.counters["retries"] == 2
    line.inject("garbage", 1)  # noise on the line before a reply: resynchronised, no retry
    assert len(await s.sample()) == 28
    assert s.counters["garbage_bytes"] >= 16 and s.counters["retries"] == 2
    unit.inject_exception(0x02)  # illegal data address: the request is wrong, no retry
    with pytest.raises(ProtocolError, match="illegal data address"):
        await s.sample()
    assert s.counters["retries"] == 2
    unit.inject_corrupt(2)
    with pytest.raises(ProtocolError, match="CRC"):
        await s.sample()
    await s.close()


async def test_tcp_reconnects_after_the_server_vanishes(ctx: BuildContext) -> None:
    s = await one(ctx, transport="tcp")
    server = s.emulator
    assert isinstance(server, ModbusTcpServer)
    assert len(await s.sample()) == 28
    await server.unplug()
    with pytest.raises(DeviceNotReady):
        await s.sample()
    await server.replug()

    async def works() -> bool:
        with contextlib.suppress(DeviceNotReady):
            return len(await s.sample()) == 28
        return False

    ok = False
    for _ in range(100):  # bounded: the link backs off between reconnects
        if ok := await works():
            break
        await asyncio.sleep(0.1)
    assert ok
    assert s.link.connects == 2  # type: ignore[attr-defined]
    await s.close()


async def test_units_at_different_rates_cannot_share_a_line(ctx: BuildContext) -> None:
    build_sensor(modbus_cfg("a", "eastron-sdm630", 1), ctx)
    slow = modbus_cfg("b", "eastron-sdm120", 2)
    slow = slow.model_copy(update={"options": {**slow.options, "baudrate": 2400}})
    with pytest.raises(ConfigurationError, match=r"runs at 9600 baud 8N1.*asks for 2400"):
        build_sensor(slow, ctx)


async def test_a_tcp_unit_that_never_answers_delays_no_other(ctx: BuildContext) -> None:
    a = await one(ctx, transport="tcp")
    b = build_sensor(modbus_cfg("b", "pzem-004t-v3", 9, "tcp"), ctx)
    assert isinstance(b, ModbusSensor) and b.link is a.link
    await b.open()
    server = a.emulator
    assert isinstance(server, ModbusTcpServer)
    server.units[4].vanish()
    slow = asyncio.create_task(a.sample())
    fast = await b.sample()  # answered while a's request is still pending
    assert len(fast) == 7 and not slow.done()
    with pytest.raises(DeviceNotReady):
        await slow
    await a.close()
    await b.close()
