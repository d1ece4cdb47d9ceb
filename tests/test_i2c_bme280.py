"""BME280: datasheet compensation, the driver's bus traffic, and chip behaviour on the emulator."""

from __future__ import annotations

import pytest

from agent.config.schema import SensorConfig
from drivers.base import BuildContext, ConfigurationError, ProtocolError
from drivers.emulated.bme280 import Bme280Emulator
from drivers.emulated.i2c_setup import emulated_bus
from drivers.i2c import bme280
from drivers.i2c.bme280 import (
    compensate_humidity,
    compensate_pressure,
    compensate_temperature,
    measurement_time_max_s,
    parse_calibration,
    parse_raw,
)
from drivers.registry import build_sensor

# BMP280 datasheet section 3.12: trimming 0x88..0x9F and raw 0xF7..0xFC.
EXAMPLE_CAL = bytes.fromhex("706B436718FC7D8E43D6D00B270B8C00F9FF8C3CF8C67017")
EXAMPLE_RAW = bytes.fromhex("655AC07EED00")




def make(ctx: BuildContext, **options: object) -> tuple[bme280.Bme280Sensor, Bme280Emulator]:
    cfg = SensorConfig(name="env", driver="bme280", bus="emulated", address=0x76,
                       options=dict(options))
    sensor = build_sensor(cfg, ctx)
    chip = emulated_bus(ctx).chip(0x76)
    assert isinstance(chip, Bme280Emulator)
    return sensor, chip


def test_worked_example_temperature_and_pressure() -> None:
    cal = parse_calibration(EXAMPLE_CAL + bytes(2), bytes(7))
    assert (cal.t1, cal.t2, cal.t3) == (27504, 26435, -1000)
    assert (cal.p1, cal.p9) == (36477, 6000)
    raw = parse_raw(EXAMPLE_RAW + b"\x80\x00")
    assert (raw.adc_p, raw.adc_t, raw.adc_h) == (415148, 519888, 0x8000)
    temperature, t_fine = compensate_temperature(raw.adc_t, cal)
    assert t_fine == 128422
    assert round(temperature, 7) == 25.0824779
    pressure = compensate_pressure(raw.adc_p, t_fine, cal)
    assert pressure is not None
    assert round(pressure, 6) == 100653.258145


def test_humidity_calibration_shares_register_e5() -> None:
    # E4 and E6 are signed; E5 holds H4's low nibble and H5's low nibble.
    hum = bytes((0x6A, 0x01, 0x07, 0xFF, 0x3A, 0x80, 0xE2))
    cal = parse_calibration(bytes(25) + b"\x4b", hum)
    assert cal.h1 == 75
    assert cal.h2 == 362
    assert cal.h3 == 7
    assert cal.h4 == -16 | 0xA == -6
    assert cal.h5 == -2048 | 0x3 == -2045
    assert cal.h6 == -30


def test_humidity_compensation_is_not_clamped() -> None:
    cal = parse_calibration(EXAMPLE_CAL + b"\x00\x4b", bytes((0x6A, 1, 0, 0x13, 0x29, 3, 0x1E)))
    _, t_fine = compensate_temperature(519888, cal)
    assert compensate_humidity(0xFFFF, t_fine, cal) > 100.0
    assert compensate_humidity(0, t_fine, cal) < 0.0


def test_measurement_time_follows_datasheet() -> None:
    # 1.25 + 2.3 + (2.3 + 0.575) + (2.3 + 0.575) ms at x1 everywhere
    assert measurement_time_max_s(1, 1, 1) == pytest.approx(9.3e-3)
    assert measurement_time_max_s(16, 0, 0) == pytest.approx((1250 + 2300 * 16) / 1e6)


async def test_forced_read_transaction_sequence(ctx: BuildContext) -> None:
    sensor, chip = make(ctx)
    chip.pin(21.5, 48.0, 100_800.0)
    bus = emulated_bus(ctx)
    await sensor.open()
    assert list(bus.log) == [
        ("read_byte_data", 0x76, 0xD0),  # chip id
        ("write_byte_data", 0x76, 0xE0, 0xB6),  # soft reset
        ("read_byte_data", 0x76, 0xF3),  # im_update clear
        ("read_i2c_block_data", 0x76, 0x88, 26),  # T/P calibration and H1
        ("read_i2c_block_data", 0x76, 0xE1, 7),  # H2..H6
        ("write_byte_data", 0x76, 0xF2, 0x01),  # ctrl_hum: osrs_h x1, before ctrl_meas
        ("write_byte_data", 0x76, 0xF5, 0x00),  # config, written while asleep
        ("write_byte_data", 0x76, 0xF4, 0x24),  # ctrl_meas: osrs_t x1, osrs_p x1, sleep
    ]
    bus.clear_log()
    readings = await sensor.sample()
    assert list(bus.log) == [
        ("write_byte_data", 0x76, 0xF4, 0x25),  # forced mode: one measurement
        ("read_byte_data", 0x76, 0xF3),  # status.measuring clear after the worst-case time
        ("read_i2c_block_data", 0x76, 0xF7, 8),  # burst read of P, T and H
    ]
    values = {r.quantity: r for r in readings}
    assert values["temperature"].value == pytest.approx(21.5, abs=0.01)
    assert values["humidity"].value == pytest.approx(48.0, abs=0.02)
    assert values["pressure"].value == pytest.approx(100_800.0, abs=1.0)
    assert [values[q].unit for q in ("temperature", "humidity", "pressure")] == [
        "degC", "%RH", "Pa"]
    assert all(r.quality == "good" and r.sensor == "env" for r in readings)
    assert chip.measurements == 1
    assert chip.mode == bme280.MODE_SLEEP  # back asleep after the forced measurement


async def test_oversampling_and_filter_are_written(ctx: BuildContext) -> None:
    sensor, chip = make(ctx, oversampling_t=2, oversampling_p=16, oversampling_h=4, filter=4)
    await sensor.open()
    assert chip.regs[0xF2] == 0x03
    assert chip.regs[0xF5] == 0x02 << 2
    assert chip.regs[0xF4] == (0x02 << 5) | (0x05 << 2)
    readings = await sensor.sample()
    assert {r.quantity for r in readings} == {"temperature", "humidity", "pressure"}


async def test_normal_mode_reads_without_triggering(ctx: BuildContext) -> None:
    sensor, chip = make(ctx, mode="normal", standby_ms=0.5)
    chip.pin(5.0, 80.0, 99_000.0)
    bus = emulated_bus(ctx)
    await sensor.open()
    assert chip.mode == bme280.MODE_NORMAL
    bus.clear_log()
    readings = await sensor.sample()
    assert list(bus.log) == [("read_i2c_block_data", 0x76, 0xF7, 8)]
    assert {r.quantity: round(r.value, 1) for r in readings} == {
        "temperature": 5.0, "humidity": 80.0, "pressure": 99_000.0}


async def test_skipped_channel_is_not_emitted(ctx: BuildContext) -> None:
    sensor, _ = make(ctx, oversampling_h=0)
    await sensor.open()
    readings = await sensor.sample()
    assert [r.quantity for r in readings] == ["temperature", "pressure"]


async def test_reset_chip_gives_protocol_error_then_reopens(ctx: BuildContext) -> None:
    sensor, chip = make(ctx)
    chip.pin(20.0, 50.0, 101_000.0)
    await sensor.open()
    await sensor.sample()
    chip.power_on_reset()  # ctrl_hum back to 0: the next measurement skips humidity
    with pytest.raises(ProtocolError) as err:
        await sensor.sample()
    assert "i2c-emulated 0x76 reg 0xFD" in str(err.value)
    assert "lost its settings" in str(err.value)
    await sensor.close()
    await sensor.open()
    readings = await sensor.sample()
    assert {r.quantity: round(r.value) for r in readings} == {
        "temperature": 20, "humidity": 50, "pressure": 101_000}


async def test_out_of_range_is_flagged_not_clamped(ctx: BuildContext) -> None:
    sensor, chip = make(ctx)
    chip.pin(-45.0, 50.0, 101_000.0)
    await sensor.open()
    readings = {r.quantity: r for r in await sensor.sample()}
    t = readings["temperature"]
    assert t.value == pytest.approx(-45.0, abs=0.01)
    assert t.quality == "suspect"
    assert t.reasons == ("out_of_range",)
    assert readings["pressure"].quality == "good"
    assert sensor.counters["out_of_range"] == 1


@pytest.mark.parametrize(("chip_id", "words"), [
    (0x58, ["0x58", "BMP280", "no humidity", "i2c-emulated 0x76 reg 0xD0"]),
    (0x42, ["0x42", "unknown device", "not a BME280 (0x60)"]),
])
async def test_wrong_chip_id_is_a_configuration_error(ctx: BuildContext, chip_id: int,
                                                      words: list[str]) -> None:
    emulated_bus(ctx).attach(0x76, Bme280Emulator(chip_id=chip_id))
    sensor, _ = make(ctx)
    with pytest.raises(ConfigurationError) as err:
        await sensor.open()
    for word in words:
        assert word in str(err.value)


async def test_emulated_weather_follows_the_day(ctx: BuildContext) -> None:
    clock_s = {"now": 3 * 3600.0}  # 03:00 UTC
    chip = emulated_bus(ctx).attach(0x76, Bme280Emulator(env_time=lambda: clock_s["now"],
                                                         noise=False))
    sensor, _ = make(ctx)
    assert emulated_bus(ctx).chip(0x76) is chip
    await sensor.open()
    night = {r.quantity: r.value for r in await sensor.sample()}
    clock_s["now"] = 15 * 3600.0  # 15:00 UTC
    afternoon = {r.quantity: r.value for r in await sensor.sample()}
    assert afternoon["temperature"] > night["temperature"] + 10
    assert afternoon["humidity"] < night["humidity"] - 30
    assert abs(afternoon["pressure"] - night["pressure"]) < 2000


@pytest.mark.parametrize(("options", "message"), [
    ({"oversampling_h": 3}, "options.oversampling_h"),
    ({"oversampling_t": 0}, "options.oversampling_t"),
    ({"standby_ms": 7}, "7 is not a standby time"),
    ({"mode": "fast"}, "options.mode"),
    ({"oversampling": 1}, "options.oversampling: unknown option"),
])
async def test_bad_options_name_the_key(ctx: BuildContext, options: dict[str, object],
                                        message: str) -> None:
    cfg = SensorConfig(name="env", driver="bme280", bus="emulated", address=0x76,
                       options=options)
    with pytest.raises(ConfigurationError) as err:
        build_sensor(cfg, ctx)
    assert message in str(err.value)
    assert "sensor 'env'" in str(err.value)
