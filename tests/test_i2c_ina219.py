"""INA219: datasheet decoding and calibration, and the driver against the emulated chip,
including a brown-out reset and math overflow."""

from __future__ import annotations

import asyncio

import pytest

from agent.config.schema import SensorConfig
from agent.readings import Reading
from agent.supervisor import SensorSupervisor
from drivers.base import BuildContext, ConfigurationError
from drivers.emulated.i2c_setup import emulated_bus
from drivers.emulated.ina219 import Ina219Emulator, solar_charge
from drivers.i2c import ina219
from drivers.i2c.ina219 import Ina219Options, bus_voltage, calibration, shunt_voltage
from drivers.registry import build_sensor
from tests.waiting import until


def make(ctx: BuildContext, **options: object) -> tuple[ina219.Ina219Sensor, Ina219Emulator]:
    cfg = SensorConfig(name="pv", driver="ina219", bus="emulated", address=0x40,
                       options=dict(options))
    sensor = build_sensor(cfg, ctx)
    chip = emulated_bus(ctx).chip(0x40)
    assert isinstance(chip, Ina219Emulator)
    return sensor, chip


def values(readings: object) -> dict[str, float]:
    return {r.quantity: r.value for r in readings}  # type: ignore[attr-defined]


def test_datasheet_examples() -> None:
    # 0.1 ohm shunt, 16 V range, +-40 mV: bus 0x2592 -> 4.808 V, shunt 0x07D0 -> 20.0 mV.
    assert bus_voltage(0x2592) == pytest.approx(4.808, abs=1e-12)
    assert shunt_voltage(0x07D0) == pytest.approx(0.020, abs=1e-12)
    assert shunt_voltage(0xF830) == pytest.approx(-0.020, abs=1e-12)  # two's complement


def test_calibration_formula() -> None:
    # Current_LSB = 3.2 / 2^15; Cal = trunc(0.04096 / (Current_LSB * 0.1)) = trunc(4194.304)
    cal = calibration(0.1, 3.2)
    assert cal.cal == 4194
    assert cal.current_lsb_a == pytest.approx(0.04096 / (4194 * 0.1))
    assert cal.current_lsb_a == pytest.approx(3.2 / 32768, rel=1 / 4194)
    assert cal.power_lsb_w == pytest.approx(20 * cal.current_lsb_a)
    # trunc(13421.77) = 13421 is odd; the register has no bit 0, so 13420 is what it holds.
    assert calibration(0.1, 1.0).cal == 13420
    with pytest.raises(ValueError, match="too small"):
        calibration(0.1, 0.01)


def test_options_choose_the_shunt_range() -> None:
    assert Ina219Options().config() == ina219.CONFIG_POR  # 32 V, 320 mV, 12 bit, continuous
    small = Ina219Options(shunt_ohms=0.1, max_current_a=0.35)
    assert small.range_mv() == 40
    assert (small.config() >> 11) & 0x3 == 0
    assert Ina219Options(averaging=128).config() & 0x7F8 == (0xF << 7) | (0xF << 3)


@pytest.mark.parametrize(("options", "message"), [
    ({"max_current_a": 5.0}, "drops 500 mV, beyond the largest shunt range (320 mV)"),
    ({"max_current_a": 1.0, "shunt_range_mv": 40}, "beyond the shunt range (40 mV)"),
    ({"shunt_ohms": 0}, "options.shunt_ohms"),
    ({"averaging": 3}, "options.averaging"),
    ({"gain": 8}, "options.gain: unknown option"),
])
async def test_bad_options_name_the_key(ctx: BuildContext, options: dict[str, object],
                                        message: str) -> None:
    cfg = SensorConfig(name="pv", driver="ina219", bus="emulated", address=0x40,
                       options=options)
    with pytest.raises(ConfigurationError) as err:
        build_sensor(cfg, ctx)
    assert message in str(err.value)


async def test_reads_the_emulated_load(ctx: BuildContext) -> None:
    sensor, chip = make(ctx, shunt_ohms=0.1, max_current_a=3.2)
    chip.pin(13.2, 1.5)
    await sensor.open()
    assert (chip.config, chip.cal) == (sensor.config, 4194)
    readings = await sensor.sample()
    assert [(r.quantity, r.unit) for r in readings] == [
        ("bus_voltage", "V"), ("shunt_voltage", "V"), ("current", "A"), ("power", "W")]
    v = values(readings)
    assert v["bus_voltage"] == pytest.approx(13.2, abs=0.004)
    assert v["shunt_voltage"] == pytest.approx(0.150, abs=1e-5)
    assert v["current"] == pytest.approx(1.5, abs=2 * sensor.cal.current_lsb_a)
    assert v["power"] == pytest.approx(1.5 * 13.2, abs=2 * sensor.cal.power_lsb_w)
    assert all(r.quality == "good" for r in readings)


async def test_negative_current_at_night(ctx: BuildContext) -> None:
    sensor, chip = make(ctx)
    chip.pin(12.3, -0.12)
    await sensor.open()
    v = values(await sensor.sample())
    assert v["current"] == pytest.approx(-0.12, abs=2 * sensor.cal.current_lsb_a)
    assert v["power"] == pytest.approx(0.12 * 12.3, abs=2 * sensor.cal.power_lsb_w)


async def test_sample_reads_settings_then_measurement(ctx: BuildContext) -> None:
    sensor, _ = make(ctx)
    await sensor.open()
    bus = emulated_bus(ctx)
    bus.clear_log()
    await sensor.sample()
    pointers = [entry[1][2] for entry in bus.log]  # the pointer byte of each combined transfer
    assert all(entry[0] == "i2c_rdwr" for entry in bus.log)
    assert pointers == [b"\x00", b"\x05", b"\x02", b"\x01", b"\x04", b"\x03"]


async def test_brown_out_mid_run_rewrites_calibration(ctx: BuildContext) -> None:
    sensor, chip = make(ctx)
    chip.pin(12.8, 2.0)
    await sensor.open()
    before = values(await sensor.sample())
    assert before["current"] == pytest.approx(2.0, abs=2 * sensor.cal.current_lsb_a)

    chip.brown_out()
    assert (chip.config, chip.cal) == (ina219.CONFIG_POR, 0)
    bus = emulated_bus(ctx)
    bus.clear_log()
    after = await sensor.sample()

    assert sensor.counters["resets"] == 1
    assert ("write_i2c_block_data", 0x40, ina219.REG_CAL, (0x10, 0x62)) in bus.log  # 4194
    assert chip.cal == sensor.cal.cal
    assert values(after)["current"] == pytest.approx(2.0, abs=2 * sensor.cal.current_lsb_a)
    assert values(after)["power"] == pytest.approx(25.6, abs=2 * sensor.cal.power_lsb_w)
    await sensor.sample()
    assert sensor.counters["resets"] == 1  # detected once, not on every sample


async def test_math_overflow_emits_no_current_or_power_and_is_counted(
        ctx: BuildContext) -> None:
    sensor, chip = make(ctx)
    chip.pin(12.5, 1.0)
    chip.force_overflow()  # from the first conversion on
    await sensor.open()
    readings = {r.quantity: r for r in await sensor.sample()}
    assert sorted(readings) == ["bus_voltage", "shunt_voltage"]  # no current, no power
    assert readings["shunt_voltage"].reasons == ("overflow",)
    assert readings["bus_voltage"].quality == "good"
    assert sensor.counters["overflow"] == 1
    await sensor.sample()
    assert sensor.counters["overflow"] == 2
    chip.force_overflow(False)
    after = await sensor.sample()
    assert {r.quantity for r in after} == {"bus_voltage", "shunt_voltage", "current", "power"}
    assert all(r.quality == "good" for r in after)


async def test_shunt_beyond_range_is_flagged(ctx: BuildContext) -> None:
    sensor, chip = make(ctx, max_current_a=0.35)  # 40 mV range: 0.4 A saturates it
    chip.pin(12.5, 0.6)
    await sensor.open()
    readings = {r.quantity: r for r in await sensor.sample()}
    assert readings["shunt_voltage"].value == pytest.approx(0.040)
    assert readings["shunt_voltage"].reasons == ("overflow",)
    # The chip sets OVF too when the shunt saturates: no current or power from that sample.
    assert "current" not in readings and "power" not in readings


def test_solar_day_shape() -> None:
    noon_v, noon_a = solar_charge(12 * 3600.0)
    night_v, night_a = solar_charge(0.0)
    assert 12.0 <= night_v < noon_v <= 14.0
    assert night_a < 0 < noon_a
    assert noon_a > 1.0


async def test_math_overflow_shows_in_the_sensor_health(ctx: BuildContext) -> None:
    cfg = SensorConfig(name="pv", driver="ina219", bus="emulated", address=0x40, period_s=0.05)
    sensor = build_sensor(cfg, ctx)
    chip = emulated_bus(ctx).chip(0x40)
    assert isinstance(chip, Ina219Emulator)
    chip.pin(12.5, 1.0)
    chip.force_overflow()
    got: list[Reading] = []
    sup = SensorSupervisor("pv", "ina219", lambda: sensor, got.append, backoff_initial_s=0.05,
                           backoff_max_s=0.1, down_after=3, open_timeout_s=2.0)
    task = asyncio.create_task(sup.run(), name="supervised-pv")
    try:
        await until(lambda: sup.snapshot(0.0)["counters"].get("overflow", 0) >= 2, 5,
                    "overflows counted in health")
        health = sup.snapshot(0.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert health["state"] == "up" and health["counters"]["overflow"] >= 2
    assert {r.quantity for r in got} == {"bus_voltage", "shunt_voltage"}
    assert "current" not in health["last_values"] and "power" not in health["last_values"]
