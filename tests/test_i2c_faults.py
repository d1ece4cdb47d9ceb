"""Faults every I2C sensor shares: absent at start, unplugged and back, NACK storms, and the
supervisor's close/open/run cycle bringing data back."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from agent.clock import SystemClock
from agent.config.schema import SensorConfig
from agent.readings import Reading
from drivers.base import BuildContext, DeviceNotReady, DriverError, Sensor
from drivers.emulated.i2c_bus import EmulatedChip, EmulatedI2CBus
from drivers.emulated.i2c_setup import emulated_bus
from drivers.i2c import ads1115, bme280, ina219
from drivers.i2c.bus import AsyncI2CBus, install_emulated_bus
from drivers.i2c.regio import I2CNoAck
from drivers.registry import build_sensor

# driver module, address, register of the first transfer that open() makes
CHIPS = [(bme280, 0x76, 0xD0), (ina219, 0x40, 0x00), (ads1115, 0x48, 0x01)]
IDS = ["bme280", "ina219", "ads1115"]




def make(ctx: BuildContext, module: Any, address: int, period_s: float = 1.0
         ) -> tuple[Any, EmulatedChip]:
    cfg = SensorConfig(name="s", driver=module.__name__.rsplit(".", 1)[1], bus="emulated",
                       address=address, period_s=period_s)
    sensor = build_sensor(cfg, ctx)
    chip = emulated_bus(ctx).chip(address)
    assert chip is not None
    return sensor, chip


async def test_absent_device_names_bus_address_and_register() -> None:
    # A bus labelled as the real adapter would be, with nothing at 0x76.
    async with contextlib.AsyncExitStack() as stack:
        ctx = BuildContext(SystemClock(), stack)
        empty = EmulatedI2CBus("i2c-1")
        install_emulated_bus(ctx, empty)
        cfg = SensorConfig(name="env", driver="bme280", bus="emulated", address=0x76)
        sensor = build_sensor(cfg, ctx)
        empty.detach(0x76)  # build attached an emulator; take it away again
        with pytest.raises(DeviceNotReady) as err:
            await sensor.open()
        assert str(err.value) == "i2c-1 0x76 reg 0xD0: no ACK (device absent?)"
        assert isinstance(err.value, I2CNoAck)
        assert sensor.counters == {"nack": 1}


@pytest.mark.parametrize(("module", "address", "first_reg"), CHIPS, ids=IDS)
async def test_absent_at_start(ctx: BuildContext, module: Any, address: int,
                               first_reg: int) -> None:
    sensor, chip = make(ctx, module, address)
    chip.unplug()
    with pytest.raises(DeviceNotReady) as err:
        await sensor.open()
    assert str(err.value) == (f"i2c-emulated 0x{address:02X} reg 0x{first_reg:02X}: "
                              "no ACK (device absent?)")


@pytest.mark.parametrize(("module", "address", "first_reg"), CHIPS, ids=IDS)
async def test_vanishes_and_comes_back(ctx: BuildContext, module: Any, address: int,
                                       first_reg: int) -> None:
    sensor, chip = make(ctx, module, address)
    await sensor.open()
    first = await sensor.sample()
    assert first

    chip.unplug()
    with pytest.raises(DeviceNotReady, match="no ACK"):
        await sensor.sample()
    await sensor.close()
    with pytest.raises(DeviceNotReady, match=f"reg 0x{first_reg:02X}: no ACK"):
        await sensor.open()

    chip.replug()  # comes back with power-on registers: open must configure it again
    await sensor.open()
    again = await sensor.sample()
    assert [r.quantity for r in again] == [r.quantity for r in first]
    assert all(r.quality == "good" for r in again)


@pytest.mark.parametrize(("module", "address", "first_reg"), CHIPS, ids=IDS)
async def test_nack_storm(ctx: BuildContext, module: Any, address: int,
                          first_reg: int) -> None:
    sensor, chip = make(ctx, module, address)
    bus = emulated_bus(ctx)
    chip.nack_storm(3)
    failures = 0
    for _ in range(5):
        try:
            await sensor.open()
            break
        except DeviceNotReady:
            failures += 1
    assert failures == 3
    assert chip.nacks == 3 and bus.nacks == 3
    assert sensor.counters["nack"] == 3
    assert await sensor.sample()


async def supervise(sensor: Sensor, emit: Any, failures: list[BaseException]) -> None:
    """What the agent's supervisor does, in miniature: open, run, close, back off, again."""
    while True:
        try:
            await sensor.open()
            await sensor.run(emit)
        except DriverError as exc:
            failures.append(exc)
        finally:
            await sensor.close()
        await asyncio.sleep(0.01)


async def next_reading(queue: asyncio.Queue[Reading], quantity: str) -> Reading:
    while True:
        r = await queue.get()
        if r.quantity == quantity:
            return r


@pytest.mark.parametrize(("module", "address", "quantity"), [
    (bme280, 0x76, "temperature"), (ina219, 0x40, "current"), (ads1115, 0x48, "ain0")],
    ids=IDS)
async def test_supervised_run_resumes_after_unplug(ctx: BuildContext, module: Any,
                                                   address: int, quantity: str) -> None:
    sensor, chip = make(ctx, module, address, period_s=0.02)
    queue: asyncio.Queue[Reading] = asyncio.Queue()
    failures: list[BaseException] = []
    task = asyncio.create_task(supervise(sensor, queue.put_nowait, failures), name="supervise")
    try:
        await asyncio.wait_for(next_reading(queue, quantity), 5)
        chip.unplug()

        async def failed_twice() -> None:
            while len(failures) < 2:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(failed_twice(), 5)
        assert all(isinstance(f, DeviceNotReady) for f in failures)
        while not queue.empty():
            queue.get_nowait()
        chip.replug()
        resumed = await asyncio.wait_for(next_reading(queue, quantity), 5)
        assert resumed.quality == "good"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_sample_before_open_is_not_ready(ctx: BuildContext) -> None:
    for module, address, _ in CHIPS:
        sensor, _ = make(ctx, module, address)
        with pytest.raises(DeviceNotReady, match="not open"):
            await sensor.sample()


async def test_sensors_share_one_bus(ctx: BuildContext) -> None:
    sensors = [make(ctx, module, address)[0] for module, address, _ in CHIPS]
    buses = {id(s.bus) for s in sensors}
    assert len(buses) == 1
    shared = ctx.shared["i2c:emulated"]
    assert isinstance(shared, AsyncI2CBus)
    for s in sensors:
        await s.open()
    results = await asyncio.gather(*(s.sample() for s in sensors))
    assert [len(r) for r in results] == [3, 4, 4]
