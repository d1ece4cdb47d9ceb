"""The ``bridge`` driver: readings from the emulated MCU through build(cfg, ctx) + run(emit)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.config.schema import SensorConfig
from agent.readings import Reading
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady, Sensor
from drivers.registry import builder
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.hub import BridgeHub
from firmware_bridge.messages import ChannelKind, ChannelRecord
from firmware_bridge.sensor import BridgeSensor

PPK = 100_000.0  # a high meter constant so that a short test sees pulses


class MorningClock:
    """Monotonic time of the process, wall time placed at 08:00 UTC (the morning peak)."""

    def __init__(self) -> None:
        import time

        self._mono = time.monotonic_ns
        eight = datetime(2026, 3, 10, 8, 0, tzinfo=UTC).timestamp()
        self._offset = int(eight * 1e9) - self._mono()

    def wall_ns(self) -> int:
        return self._mono() + self._offset

    def mono_ns(self) -> int:
        return self._mono()

    def synced(self) -> bool:
        return True


def sensor_cfg(name: str, **options: Any) -> SensorConfig:
    opts = {"emulator": {"peak_veh_h": 7200, "pulses_per_kwh": PPK}, **options}
    return SensorConfig(name=name, driver="bridge", port="emulated", period_s=0.05,
                        timeout_s=1.0, options=opts)


@pytest.fixture
async def ctx() -> AsyncIterator[BuildContext]:
    async with contextlib.AsyncExitStack() as stack:
        yield BuildContext(clock=MorningClock(), stack=stack)


async def collect(sensors: list[Sensor], done: Callable[[list[Reading]], bool],
                  timeout_s: float = 15.0) -> list[Reading]:
    """Run the sensors until ``done(readings)``; bounded by ``timeout_s``."""
    out: list[Reading] = []
    enough = asyncio.Event()

    def emit(r: Reading) -> None:
        out.append(r)
        if done(out):
            enough.set()

    async def body() -> None:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(s.run(emit), name=f"run-{s.name}") for s in sensors]
            await enough.wait()
            for t in tasks:
                t.cancel()

    await asyncio.wait_for(body(), timeout_s)
    return out


def total(readings: list[Reading], channel: str) -> float:
    return sum(r.value for r in readings if r.channel == channel)


async def test_loop_and_meter_channels_produce_readings(ctx: BuildContext) -> None:
    loop = builder("bridge")(sensor_cfg("loop_n", channel=0, kind="loop"), ctx)
    meter = builder("bridge")(sensor_cfg("meter", channel=2, pulses_per_kwh=PPK), ctx)
    assert isinstance(loop, BridgeSensor) and isinstance(meter, BridgeSensor)
    assert loop.hub is meter.hub  # one link for the MCU
    await loop.open()
    await meter.open()
    assert meter.kind == ChannelKind.PULSE

    def enough(rs: list[Reading]) -> bool:
        return total(rs, "loop_n.vehicle_count") >= 2 and total(rs, "meter.pulses") >= 5

    readings = await collect([loop, meter], enough)
    channels = {r.channel: r.unit for r in readings}
    assert channels == {"loop_n.occupancy": "1", "loop_n.vehicle_count": "count",
                        "meter.pulses": "count", "meter.energy": "Wh"}
    occupancy = [r.value for r in readings if r.quantity == "occupancy"]
    assert all(0.0 <= v <= 1.0 for v in occupancy) and max(occupancy) > 0
    pulses = [r for r in readings if r.channel == "meter.pulses"]
    energy = [r for r in readings if r.channel == "meter.energy"]
    for p, e in zip(pulses, energy, strict=True):
        assert e.value == pytest.approx(p.value * 1000.0 / PPK)
        assert e.mono_ns == p.mono_ns
    assert all(r.quality == "good" for r in readings)
    # Stamped by the MCU clock mapped to host time: increasing, close to now.
    monos = [r.mono_ns for r in readings if r.channel == "loop_n.vehicle_count"]
    assert monos == sorted(monos) and len(set(monos)) == len(monos)
    now = ctx.clock.mono_ns()
    assert all(now - 5e9 < m <= now + 1e8 for m in monos)
    assert all(abs((r.ts_ns - r.mono_ns) - (ctx.clock.wall_ns() - ctx.clock.mono_ns())) < 1e6
               for r in readings)
    # The emulator lives in ctx.shared and goes away with the stack.
    emu = ctx.shared["firmware_bridge:emulator"]
    assert isinstance(emu, BridgeEmulator) and os.path.exists(emu.port)
    await ctx.stack.aclose()
    assert not os.path.exists(emu.port)


async def test_unplug_raises_not_ready_and_a_new_run_reconnects(ctx: BuildContext) -> None:
    sensor = builder("bridge")(sensor_cfg("loop_s", channel=1), ctx)
    assert isinstance(sensor, BridgeSensor)
    await sensor.open()
    emu = ctx.shared["firmware_bridge:emulator"]
    await collect([sensor], lambda rs: len(rs) >= 4)

    got: list[Reading] = []
    run = asyncio.create_task(sensor.run(got.append), name="run-loop_s")

    async def until_some() -> None:
        while len(got) < 2:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(until_some(), 10)
    emu.unplug()
    with pytest.raises(DeviceNotReady):
        await asyncio.wait_for(run, 10)
    with pytest.raises(DeviceNotReady, match="cannot open the port"):
        await sensor.open()  # what the supervisor's retry sees while the cable is out
    emu.replug()
    await sensor.open()
    readings = await collect([sensor], lambda rs: len(rs) >= 4)
    assert {r.channel for r in readings} == {"loop_s.occupancy", "loop_s.vehicle_count"}
    hub = sensor.hub
    assert isinstance(hub, BridgeHub) and hub.counters["connects"] == 2


async def test_silent_device_is_not_ready(ctx: BuildContext) -> None:
    sensor = builder("bridge")(sensor_cfg("loop_q", channel=0), ctx)
    assert isinstance(sensor, BridgeSensor)
    await sensor.open()
    client = await sensor.hub.acquire()
    await client.set_config(1, 60_000)  # the MCU now reports once a minute
    with pytest.raises(DeviceNotReady, match=r"no report for 1\.0 s"):
        await asyncio.wait_for(sensor.run(lambda r: None), 10)
    assert sensor.counters["stale"] == 1


@pytest.mark.parametrize(("options", "message"), [
    ({}, "options.channel is required"),
    ({"channel": 0, "kind": "radar"}, "options.kind 'radar' is not loop or pulse"),
    ({"channel": 300}, "options.channel 300 is outside 0..255"),
    ({"channel": 0, "pulses_per_kwh": 0}, "pulses_per_kwh 0.0 must be > 0"),
    ({"channel": 0, "emulator": {"channels": ["loop", "sonar"]}}, "'sonar' is not loop or pulse"),
    ({"channel": 0, "emulator": {"colour": 1}}, "unknown keys ['colour']"),
])
async def test_bad_options_are_configuration_errors(ctx: BuildContext, options: dict[str, Any],
                                                    message: str) -> None:
    cfg = SensorConfig(name="bad", driver="bridge", port="emulated", options=options)
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        builder("bridge")(cfg, ctx)


async def test_channel_must_exist_and_match_its_kind(ctx: BuildContext) -> None:
    missing = builder("bridge")(sensor_cfg("x", channel=9), ctx)
    with pytest.raises(ConfigurationError, match="the device has 4 channels"):
        await missing.open()
    wrong = builder("bridge")(sensor_cfg("y", channel=2, kind="loop"), ctx)
    with pytest.raises(ConfigurationError, match="channel is a pulse input, configured as loop"):
        await wrong.open()


def test_occupancy_beyond_the_interval_is_clamped_and_flagged() -> None:
    from agent.clock import SystemClock

    hub = BridgeHub("x", baudrate=1, timeout_s=1, mono_ns=SystemClock().mono_ns)
    sensor = BridgeSensor("l", SystemClock(), hub, channel=0, kind=ChannelKind.LOOP,
                          pulses_per_kwh=1000, period_s=1, timeout_s=1)
    from firmware_bridge.hub import ChannelReport

    occ, count = sensor.readings(ChannelReport(
        ChannelRecord(0, ChannelKind.LOOP, 3, 10, 1_500_000), 1_000_000, None))
    assert occ.value == 1.0 and occ.quality == "suspect"
    assert occ.reasons == ("clock_unsynced", "out_of_range")
    assert count.value == 3.0 and count.reasons == ("clock_unsynced",)
