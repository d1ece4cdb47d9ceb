"""The per-bus worker thread, lazy opening, reopening after a bus fault, and the emulated bus's
smbus2 call surface."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import threading

import pytest
from smbus2 import i2c_msg

from agent.clock import SystemClock
from agent.config.schema import SensorConfig
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady
from drivers.emulated.bme280 import Bme280Emulator
from drivers.emulated.i2c_bus import EmulatedI2CBus
from drivers.emulated.i2c_setup import emulated_bus
from drivers.emulated.ina219 import Ina219Emulator
from drivers.i2c.bus import AsyncI2CBus, install_emulated_bus, shared_bus
from drivers.i2c.regio import I2CBusFault, RegisterIO
from drivers.registry import build_sensor


async def test_calls_run_on_one_worker_thread_off_the_loop(ctx: BuildContext) -> None:
    emulated_bus(ctx)  # installs the agent's emulated bus, as the registry does
    bus = shared_bus(ctx, "emulated")
    names = {await bus.run(lambda: threading.current_thread().name, timeout_s=1, where="t")
             for _ in range(3)}
    assert len(names) == 1
    assert names != {threading.current_thread().name}
    assert names.pop().startswith("i2c-emulated")


async def test_real_bus_opens_lazily_and_reports_a_missing_adapter(ctx: BuildContext) -> None:
    bus = shared_bus(ctx, 250)  # nothing is opened here
    assert bus.label == "i2c-250"
    assert shared_bus(ctx, 250) is bus
    with pytest.raises(DeviceNotReady) as err:
        await bus.open(timeout_s=2)
    assert str(err.value) == ("i2c-250: /dev/i2c-250 does not exist "
                              "(I2C not enabled, or adapter not loaded?)")


async def test_the_real_bus_code_never_makes_an_emulated_bus(ctx: BuildContext) -> None:
    with pytest.raises(ConfigurationError, match="emulated I2C bus is not set up"):
        shared_bus(ctx, "emulated")
    emulated = emulated_bus(ctx)
    assert shared_bus(ctx, "emulated").emulated is emulated


async def test_no_bus_is_a_configuration_error(ctx: BuildContext) -> None:
    cfg = SensorConfig(name="env", driver="bme280", address=0x76)
    with pytest.raises(ConfigurationError, match="no I2C bus configured"):
        build_sensor(cfg, ctx)


async def test_hung_call_times_out(ctx: BuildContext) -> None:
    emulated_bus(ctx)  # installs the agent's emulated bus, as the registry does
    bus = shared_bus(ctx, "emulated")
    release = threading.Event()
    try:
        with pytest.raises(DeviceNotReady, match=r"no answer within 0\.05 s"):
            await bus.run(release.wait, 5, timeout_s=0.05, where="i2c-emulated 0x76")
    finally:
        release.set()
    assert await bus.run(lambda: 7, timeout_s=2, where="t") == 7  # queued behind it, then ran


async def test_bus_closes_with_the_agent() -> None:
    async with contextlib.AsyncExitStack() as stack:
        ctx = BuildContext(SystemClock(), stack)
        emulated_bus(ctx)
        bus = shared_bus(ctx, "emulated")
        await bus.open(timeout_s=1)
    with pytest.raises(DeviceNotReady, match="bus is closed"):
        await bus.run(lambda: None, timeout_s=1, where="i2c-emulated")


class FlakyBus(EmulatedI2CBus):
    """An emulated bus whose next read fails with EIO, as a wedged adapter does."""

    fail_next = False
    closed = 0

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.EIO, "Input/output error")
        return super().read_byte_data(i2c_addr, register)

    def close(self) -> None:
        self.closed += 1


async def test_bus_fault_reopens_the_bus(ctx: BuildContext) -> None:
    flaky = FlakyBus()
    opened: list[int] = []

    def opener() -> FlakyBus:
        opened.append(1)
        return flaky

    bus = AsyncI2CBus("i2c-3", opener, emulated=flaky)
    ctx.shared["i2c:emulated"] = bus
    sensor = build_sensor(SensorConfig(name="env", driver="bme280", bus="emulated",
                                       address=0x76), ctx)
    await sensor.open()
    assert opened == [1]
    flaky.fail_next = True
    with pytest.raises(I2CBusFault) as err:
        await sensor.open()
    assert str(err.value) == "i2c-3 0x76 reg 0xD0: I/O error: Input/output error (errno 5)"
    assert sensor.counters["bus_fault"] == 1
    await sensor.open()
    assert (opened, flaky.closed, bus.reopens) == ([1, 1], 1, 1)
    await bus.aclose()


async def test_install_emulated_bus_keeps_given_chips(ctx: BuildContext) -> None:
    own = EmulatedI2CBus()
    chip = own.attach(0x76, Bme280Emulator(noise=False))
    install_emulated_bus(ctx, own)
    build_sensor(SensorConfig(name="env", driver="bme280", bus="emulated", address=0x76), ctx)
    assert emulated_bus(ctx) is own
    assert own.chip(0x76) is chip
    with pytest.raises(ValueError, match="already set up"):
        install_emulated_bus(ctx, EmulatedI2CBus())


def test_emulated_bus_nack_is_errno_121() -> None:
    bus = EmulatedI2CBus()
    with pytest.raises(OSError) as err:
        bus.read_byte_data(0x76, 0xD0)
    assert err.value.errno == errno.EREMOTEIO == 121
    assert bus.nacks == 1
    assert list(bus.log) == [("read_byte_data", 0x76, 0xD0)]


def test_emulated_bus_smbus_shapes() -> None:
    bus = EmulatedI2CBus()
    chip = bus.attach(0x40, Ina219Emulator())
    with pytest.raises(ValueError, match="already taken"):
        bus.attach(0x40, Ina219Emulator())
    # SMBus word reads are little-endian on the wire; the INA219 sends MSB first.
    assert bus.read_word_data(0x40, 0x00) == 0x9F39
    assert bus.read_i2c_block_data(0x40, 0x00, 2) == [0x39, 0x9F]
    with pytest.raises(ValueError, match="over 32 bytes"):
        bus.read_i2c_block_data(0x40, 0x00, 33)
    write, read = i2c_msg.write(0x40, [0x00]), i2c_msg.read(0x40, 2)
    bus.i2c_rdwr(write, read)
    assert ctypes.string_at(read.buf, 2) == b"\x39\x9f"
    bus.write_i2c_block_data(0x40, 0x05, [0x10, 0x01])
    assert isinstance(chip, Ina219Emulator) and chip.cal == 0x1000  # bit 0 does not exist
    assert list(bus.log)[-2:] == [
        ("i2c_rdwr", ("w", 0x40, b"\x00"), ("r", 0x40, 2)),
        ("write_i2c_block_data", 0x40, 0x05, (0x10, 0x01)),
    ]


def test_register_io_on_any_smbus_like_bus() -> None:
    bus = EmulatedI2CBus("i2c-7")
    bus.attach(0x77, Bme280Emulator())
    io = RegisterIO(bus, 0x77, bus.label)
    assert io.read_u8(0xD0) == 0x60
    assert io.read_block(0xD0, 1) == b"\x60"
    with pytest.raises(DeviceNotReady, match=r"^i2c-7 0x76 reg 0xD0: no ACK"):
        RegisterIO(bus, 0x76, bus.label).read_u8(0xD0)
