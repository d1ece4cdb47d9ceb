"""PZEM-004T v3 driver against its pty emulator, a pymodbus server, and pymodbus as a client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.clock import SystemClock
from agent.config.schema import SensorConfig
from drivers.base import BuildContext, DeviceNotReady, DriverError, ProtocolError
from drivers.emulated.pty import PtyLink
from drivers.emulated.pzem004t import (
    EV_POWER_W,
    LAMP_W,
    LAMPS,
    PzemLine,
    ev_charger_w,
    ev_sessions,
    street_lighting_w,
)
from drivers.registry import build_sensor
from drivers.serial import pzem004t
from drivers.serial.modbus import read_registers_request
from drivers.serial.port import SerialPort
from drivers.serial.pzem004t import Measurement, PzemBus, PzemSensor
from tests.waiting import until

MANUAL = Measurement(220.0, 1.0, 220.0, 0.0, 50.0, 1.0, False)
OTHER = Measurement(231.4, 12.345, 2780.5, 123456.0, 49.9, 0.97, True)




def meter(ctx: BuildContext, name: str, address: int, **options: Any) -> PzemSensor:
    cfg = SensorConfig(name=name, driver="pzem004t", port="emulated", address=address,
                       timeout_s=0.25, options=options)
    return build_sensor(cfg, ctx)



def values(readings: Any) -> dict[str, float]:
    return {r.quantity: r.value for r in readings}


async def test_two_meters_share_one_emulated_line(ctx: BuildContext) -> None:
    a, b = meter(ctx, "lights", 1), meter(ctx, "charger", 2)
    assert a.bus is b.bus and a.emulator is b.emulator
    line: PzemLine = a.emulator
    line.meters[1].override = MANUAL
    line.meters[2].override = OTHER
    await a.open()
    await b.open()
    got = await asyncio.gather(a.sample(), b.sample(), a.sample())
    assert values(got[0]) == {
        "voltage": 220.0, "current": 1.0, "active_power": 220.0, "energy": 0.0,
        "frequency": 50.0, "power_factor": 1.0, "alarm": 0.0,
    }
    assert values(got[1])["energy"] == 123456.0 and values(got[1])["alarm"] == 1.0
    assert values(got[1])["current"] == pytest.approx(12.345)
    assert values(got[2]) == values(got[0])
    assert line.requests_seen == 3 and line.bad_requests == 0
    assert {r.unit for r in got[0]} == {"V", "A", "W", "Wh", "Hz", "1"}
    await a.close()
    assert b.bus.port.is_open  # the other meter still uses the line
    await b.close()
    assert not b.bus.port.is_open


@pytest.mark.parametrize(
    ("fault", "counter"),
    [("garbage", "garbage_bytes"), ("corrupt", "crc_errors"), ("truncate", "truncated")],
)
async def test_frame_faults_are_counted_retried_and_never_emitted(
    ctx: BuildContext, fault: str, counter: str
) -> None:
    s = meter(ctx, "m", 1)
    s.emulator.meters[1].override = OTHER
    await s.open()
    s.emulator.inject(fault)
    got = values(await s.sample())
    assert got["voltage"] == 231.4 and got["energy"] == 123456.0
    assert s.counters[counter] >= 1
    if fault != "garbage":  # garbage before a good frame needs no retry
        assert s.counters["retries"] == 1
    await s.close()


async def test_exception_reply_is_counted_and_retried(ctx: BuildContext) -> None:
    s = meter(ctx, "m", 1)
    s.emulator.meters[1].override = MANUAL
    await s.open()
    s.emulator.inject_exception(0x04)
    assert values(await s.sample())["voltage"] == 220.0
    assert s.counters["exception_replies"] == 1 and s.counters["retries"] == 1
    s.emulator.inject_exception(0x04, count=3)
    with pytest.raises(ProtocolError, match=r"exception reply 0x04 \(server device failure\)"):
        await s.sample()
    await s.close()


async def test_persistent_bad_crc_raises_protocol_error_without_values(ctx: BuildContext) -> None:
    s = meter(ctx, "m", 1, retries=1)
    await s.open()
    s.emulator.inject("corrupt", 2)
    with pytest.raises(ProtocolError, match="failed its CRC check"):
        await s.sample()
    assert s.counters["crc_errors"] >= 2
    await s.close()


async def test_silent_and_slow_meters(ctx: BuildContext) -> None:
    s = meter(ctx, "m", 1, retries=1)
    line: PzemLine = s.emulator
    line.meters[1].override = MANUAL
    await s.open()
    line.faults.silent = True
    with pytest.raises(DeviceNotReady, match=r"address 0x01: no reply to function 0x04 within"):
        await s.sample()
    assert s.counters["timeouts"] == 2
    line.faults.silent = False
    line.faults.delay_s = 0.6  # later than both attempts (2 x timeout_s)
    sent = line.frames_sent
    with pytest.raises(DeviceNotReady):
        await s.sample()
    await until(lambda: line.frames_sent == sent + 2, 3.0)  # the late replies drain
    line.faults.delay_s = 0.0
    line.faults.dribble_s = 0.002  # one byte at a time: the reply arrives in pieces
    assert values(await s.sample())["voltage"] == 220.0
    await s.close()


async def test_unplug_then_replug_recovers(ctx: BuildContext) -> None:
    s = meter(ctx, "m", 1)
    line: PzemLine = s.emulator
    line.meters[1].override = MANUAL
    await s.open()
    assert values(await s.sample())["voltage"] == 220.0
    line.unplug()
    with pytest.raises(DeviceNotReady, match=line.path):
        await s.sample()
    await s.close()
    with pytest.raises(DeviceNotReady, match="cannot open"):
        await s.open()
    await s.close()
    line.replug()
    await s.open()
    assert values(await s.sample())["voltage"] == 220.0
    await s.close()
    assert not s.bus.port.is_open  # the failed open did not leave a user behind


async def test_energy_accumulates_and_resets() -> None:
    now = [1_750_000_000.0]
    line = PzemLine(time_fn=lambda: now[0])
    line.add_meter(1, "ev_charger")
    line.add_meter(7, "street_lighting")
    await line.start()
    try:
        bus = PzemBus(SerialPort(line.path, baudrate=9600), 0.25)
        await bus.open()
        await bus.read_measurement(1)
        now[0] += 3600
        first = await bus.read_measurement(1)
        expected_wh = sum(ev_charger_w(now[0] - 3600 + i) for i in range(0, 3600, 60)) / 60
        assert first.energy_wh == pytest.approx(expected_wh, rel=0.05, abs=2)
        await bus.reset_energy(1)
        assert (await bus.read_measurement(1)).energy_wh == 0.0
        await bus.close()
        # The module-level helper used by the CLI opens, resets and closes on its own.
        now[0] += 3600
        await pzem004t.reset_energy(line.path, 1, timeout_s=0.25)
        assert line.meters[1].energy_wh == 0.0
    finally:
        await line.close()


def test_load_profiles() -> None:
    midnight = 1_750_032_000.0 - 1_750_032_000.0 % 86400  # a June day, 00:00 UTC
    assert street_lighting_w(midnight + 12 * 3600) == 0.0
    assert street_lighting_w(midnight + 23 * 3600) == LAMPS * LAMP_W
    assert street_lighting_w(midnight + 2 * 3600) == LAMPS * LAMP_W / 2  # dimmed
    # Dusk is later in June than in December.
    december = midnight - 182 * 86400
    assert street_lighting_w(december + 18.5 * 3600) > 0
    assert street_lighting_w(midnight + 18.5 * 3600) == 0
    # Charging sessions are reproducible and charge at full power in their middle.
    hours = range(int(midnight // 3600), int(midnight // 3600) + 24 * 7)
    sessions = [s for h in hours for s in ev_sessions(3, h)]
    assert sessions == [s for h in hours for s in ev_sessions(3, h)]
    assert 5 < len(sessions) < 24 * 7
    mid = sessions[0].start + sessions[0].duration_s / 2 - 1000
    assert ev_charger_w(mid, 3) == EV_POWER_W


async def test_pymodbus_server_plays_the_meter() -> None:
    """A real Modbus server implementation behind a two-pty cable; our driver reads it."""
    link = PtyLink()
    link.start()
    regs = [0x0898, 0x03E8, 0, 0x0898, 0, 0, 0, 0x01F4, 0x0064, 0]
    device = SimDevice(id=1, simdata=(
        [SimData(0, count=1, datatype=DataType.BITS)],
        [SimData(0, count=1, datatype=DataType.BITS)],
        [SimData(0, count=3, datatype=DataType.REGISTERS)],
        [SimData(0, values=regs, datatype=DataType.REGISTERS)],
    ))
    server = ModbusSerialServer(device, port=link.paths[0], baudrate=9600)
    serving = asyncio.create_task(server.serve_forever(), name="modbus-server")
    bus = PzemBus(SerialPort(link.paths[1], baudrate=9600), 0.5)
    try:
        await bus.port.open()
        m = None
        for _ in range(20):  # the server opens its port in the background
            try:
                m = await bus.read_measurement(1, retries=0)
                break
            except DeviceNotReady:
                continue
        assert m == MANUAL
        # pymodbus answers a register outside its map with an exception reply.
        with pytest.raises(ProtocolError, match="illegal data address"):
            await bus.request(read_registers_request(1, 0x20, 10), 1, 0x04, 10, retries=0)
    except ProtocolError as exc:  # pragma: no cover - shows what the server said
        raise AssertionError(str(exc)) from exc
    finally:
        await bus.close()
        await server.shutdown()  # type: ignore[no-untyped-call]
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        link.close()


class _ResetEnergy(ModbusPDU):
    function_code = 0x42
    rtu_frame_size = 4

    def encode(self) -> bytes:
        return b""

    def decode(self, data: bytes) -> None:
        pass


async def test_pymodbus_client_reads_our_emulator() -> None:
    """pymodbus as the oracle for the emulator's side of the protocol, 0x42 included."""
    line = PzemLine()
    meter_state = line.add_meter(1, "mixed")
    meter_state.override = OTHER
    await line.start()
    client = AsyncModbusSerialClient(line.path, baudrate=9600, timeout=1, retries=0)
    try:
        assert await client.connect()
        rr = await client.read_input_registers(0, count=10, device_id=1)
        assert not rr.isError()
        assert pzem004t.decode_registers(rr.registers) == OTHER
        err = await client.read_input_registers(5, count=10, device_id=1)
        assert err.isError()
        client.register(_ResetEnergy)
        meter_state.override = None
        meter_state.energy_wh = 500.0
        reply = await client.execute(False, _ResetEnergy(dev_id=1))
        assert reply.function_code == 0x42 and not reply.isError()
        assert meter_state.energy_wh == 0.0
    finally:
        client.close()
        await line.close()


async def test_errors_are_driver_errors_only(ctx: BuildContext) -> None:
    s = meter(ctx, "m", 1, retries=0)
    await s.open()
    line: PzemLine = s.emulator
    faults: list[Callable[[], None]] = [
        lambda: line.inject("truncate"),
        lambda: line.inject("corrupt"),
        lambda: line.inject_exception(0x01),
        line.unplug,
    ]
    raised: list[type[DriverError]] = []
    for inject in faults:
        inject()
        try:
            await s.sample()
        except DriverError as exc:  # anything else fails the test
            raised.append(type(exc))
    # A truncated reply is a protocol error, not "no reply"; only the unplugged line is.
    assert raised == [ProtocolError, ProtocolError, ProtocolError, DeviceNotReady]
    assert s.counters["truncated"] == 1 and s.counters["crc_errors"] >= 1
    assert s.counters["exception_replies"] == 1
    await s.close()


def test_bad_options_are_configuration_errors() -> None:
    from drivers.base import ConfigurationError

    stack = contextlib.AsyncExitStack()
    c = BuildContext(SystemClock(), stack)
    cfg = SensorConfig(name="m", driver="pzem004t", port="/dev/null", options={"retries": "x"})
    with pytest.raises(ConfigurationError, match="sensor m: option retries='x'"):
        build_sensor(cfg, c)


def test_unknown_emulator_profile_is_a_configuration_error() -> None:
    from drivers.base import ConfigurationError

    async def check() -> None:
        async with contextlib.AsyncExitStack() as stack:
            c = BuildContext(SystemClock(), stack)
            cfg = SensorConfig(name="m", driver="pzem004t", port="emulated", address=1,
                               options={"emulator": {"profile": "tram"}})
            with pytest.raises(ConfigurationError, match="sensor m emulator: unknown load profile"):
                build_sensor(cfg, c)

    asyncio.run(check())


@pytest.mark.parametrize(("fault", "message"), [
    ("truncate", "a truncated reply"),
    ("wrong_address", "a reply from address 0x02, not 0x01"),
    ("wrong_function", "a reply to function 0x03, not 0x04"),
])
async def test_bad_replies_are_protocol_errors_not_silence(ctx: BuildContext, fault: str,
                                                           message: str) -> None:
    s = meter(ctx, "m", 1, retries=0)
    await s.open()
    line: PzemLine = s.emulator
    if fault == "truncate":
        line.inject("truncate")
    else:
        line.inject_misdirected(fault)
    with pytest.raises(ProtocolError, match=message):
        await s.sample()
    assert s.counters.get("timeouts", 0) == 0
    assert s.counters[fault.replace("truncate", "truncated")] == 1
    assert set(values(await s.sample())) >= {"voltage", "energy"}  # the next one is fine
    await s.close()
