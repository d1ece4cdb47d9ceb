"""Our decoders against independent implementations on the same registers.

The oracles are Adafruit's CircuitPython drivers. They talk to a busio-style I2C object; here
that object forwards to an emulated bus through smbus2's ``i2c_rdwr``, so they read exactly the
bytes our drivers read. Known, explained differences:

- BME280 temperature: Adafruit returns int(t_fine) / 5120, quantised to 1/5120 degC; we return
  the unquantised datasheet value. Pressure uses the same truncated t_fine in both.
- BME280 humidity: Adafruit clamps to 0..100 %RH (we flag instead), and it follows the
  SensorAPI double build, which multiplies by (1 + H3 * (t_fine - 76800) / 2^26) where the
  datasheet's double formula (ours) does not. With H3 = 0 the two are the same; with any H3,
  Adafruit equals ours with H2 scaled by that factor, and ours agrees with Bosch's integer
  formula (re-derived below from the datasheet) to its resolution.
- INA219: Adafruit reports mA and uses current_LSB = 0.04096 / (Cal * R), as we do.
"""

from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import replace
from typing import Any

import adafruit_ina219
import pytest
from adafruit_ads1x15 import ads1115 as ada_ads1115
from adafruit_ads1x15.analog_in import AnalogIn
from adafruit_bme280 import basic as ada_bme280
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from smbus2 import i2c_msg

from agent.config.schema import SensorConfig
from drivers.base import BuildContext
from drivers.emulated.ads1115 import Ads1115Emulator
from drivers.emulated.bme280 import Bme280Emulator
from drivers.emulated.i2c_bus import EmulatedI2CBus, WordRegisterChip
from drivers.emulated.i2c_setup import emulated_bus
from drivers.emulated.ina219 import Ina219Emulator
from drivers.i2c import ads1115, bme280, ina219
from drivers.i2c.regio import RegisterIO
from drivers.registry import build_sensor

EXAMPLES = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


class BusioOnSmbus:
    """busio.I2C's surface on top of an smbus2-compatible bus."""

    def __init__(self, bus: EmulatedI2CBus) -> None:
        self.bus = bus

    def try_lock(self) -> bool:
        return True

    def unlock(self) -> None:
        pass

    def writeto(self, address: int, buffer: Any, *, start: int = 0, end: int | None = None
                ) -> None:
        self.bus.i2c_rdwr(i2c_msg.write(address, bytes(buffer[start:end])))

    def readfrom_into(self, address: int, buffer: Any, *, start: int = 0,
                      end: int | None = None) -> None:
        end = len(buffer) if end is None else end
        msg = i2c_msg.read(address, end - start)
        self.bus.i2c_rdwr(msg)
        buffer[start:end] = ctypes.string_at(msg.buf, end - start)

    def writeto_then_readfrom(self, address: int, out: Any, into: Any, *, out_start: int = 0,
                              out_end: int | None = None, in_start: int = 0,
                              in_end: int | None = None) -> None:
        in_end = len(into) if in_end is None else in_end
        # Copy first: Adafruit's register descriptors pass one buffer as both out and in.
        write = i2c_msg.write(address, bytes(out[out_start:out_end]))
        read = i2c_msg.read(address, in_end - in_start)
        self.bus.i2c_rdwr(write, read)
        into[in_start:in_end] = ctypes.string_at(read.buf, in_end - in_start)


class WordRegisters(WordRegisterChip):
    """Fixed 16-bit registers that keep whatever is written to them."""

    def __init__(self, values: dict[int, int]) -> None:
        super().__init__()
        self.values = dict(values)

    def read_register(self, pointer: int) -> int:
        return self.values.get(pointer, 0)

    def write_register(self, pointer: int, value: int) -> None:
        self.values[pointer] = value

    def power_on_reset(self) -> None:
        pass


class Bme280Registers:
    """The register interface ``adafruit_bme280`` accepts in place of a bus: a plain map."""

    def __init__(self, regs: bytearray) -> None:
        self.regs = regs

    def read_register(self, register: int, length: int) -> bytearray:
        return bytearray(self.regs[register:register + length])

    def write_register_byte(self, register: int, value: int) -> None:
        if register != bme280.REG_RESET:
            self.regs[register] = value


# --- BME280 ------------------------------------------------------------------------------------
u16 = st.integers(0, 0xFFFF)
s16 = st.integers(-0x8000, 0x7FFF)
s12 = st.integers(-0x800, 0x7FF)
adc20 = st.integers(0, 0xFFFFF).filter(lambda v: v != bme280.SKIPPED_TP)
any_u8 = st.integers(0, 255)


@st.composite
def bme280_registers(draw: st.DrawFn, h3: st.SearchStrategy[int] = any_u8) -> bytearray:
    regs = bytearray(256)
    t1 = draw(st.integers(1, 0xFFFF))
    p1 = draw(st.integers(1, 0xFFFF))
    tp = struct.pack("<HhhHhhhhhhhh", t1, draw(s16), draw(s16), p1,
                     *(draw(s16) for _ in range(8)))
    regs[0x88:0x88 + 24] = tp
    regs[0xA1] = draw(st.integers(0, 255))  # H1
    h4, h5 = draw(s12), draw(s12)
    regs[0xE1:0xE8] = struct.pack("<h", draw(s16)) + bytes((
        draw(h3), (h4 >> 4) & 0xFF, ((h5 & 0x0F) << 4) | (h4 & 0x0F), (h5 >> 4) & 0xFF,
        draw(st.integers(0, 255))))
    regs[0xD0] = bme280.CHIP_ID_BME280
    adc_p, adc_t, adc_h = draw(adc20), draw(adc20), draw(st.integers(0, 0xFFFF))
    # xlsb bits 3..0 always read 0 on the chip
    regs[0xF7:0xFF] = bytes((adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4,
                             adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0xF) << 4,
                             adc_h >> 8, adc_h & 0xFF))
    return regs


def ours(regs: bytearray) -> tuple[bme280.Calibration, bme280.RawSample]:
    cal = bme280.parse_calibration(bytes(regs[0x88:0xA2]), bytes(regs[0xE1:0xE8]))
    return cal, bme280.parse_raw(bytes(regs[0xF7:0xFF]))


@EXAMPLES
@given(bme280_registers())
def test_bme280_temperature_and_pressure_match_adafruit(regs: bytearray) -> None:
    cal, raw = ours(regs)
    oracle = ada_bme280.Adafruit_BME280(Bme280Registers(regs))
    temperature, t_fine = bme280.compensate_temperature(raw.adc_t, cal)
    # Adafruit: int(t_fine) / 5120, so at most one t_fine count (1/5120 degC) below ours
    assert abs(oracle.temperature - temperature) <= 1 / 5120 + 1e-12
    assert oracle._t_fine == t_fine
    pressure = bme280.compensate_pressure(raw.adc_p, t_fine, cal)
    if pressure is None:
        with pytest.raises(ArithmeticError):
            _ = oracle.pressure
    else:
        assert oracle.pressure * 100 == pytest.approx(pressure, rel=1e-12, abs=1e-9)


@EXAMPLES
@given(bme280_registers(h3=st.just(0)))
def test_bme280_humidity_matches_adafruit_when_h3_is_zero(regs: bytearray) -> None:
    cal, raw = ours(regs)
    _, t_fine = bme280.compensate_temperature(raw.adc_t, cal)
    humidity = bme280.compensate_humidity(raw.adc_h, t_fine, cal)
    oracle = ada_bme280.Adafruit_BME280(Bme280Registers(regs)).humidity
    assert oracle == pytest.approx(min(100.0, max(0.0, humidity)), rel=1e-12, abs=1e-9)


@EXAMPLES
@given(bme280_registers())
def test_bme280_humidity_differs_from_adafruit_by_the_h3_factor(regs: bytearray) -> None:
    cal, raw = ours(regs)
    _, t_fine = bme280.compensate_temperature(raw.adc_t, cal)
    oracle = ada_bme280.Adafruit_BME280(Bme280Registers(regs)).humidity
    factor = 1.0 + cal.h3 / 67108864.0 * (t_fine - 76800.0)
    as_sensor_api = bme280.compensate_humidity(raw.adc_h, t_fine,
                                               replace(cal, h2=cal.h2 * factor))  # type: ignore[arg-type]
    assert oracle == pytest.approx(min(100.0, max(0.0, as_sensor_api)), rel=1e-9, abs=1e-9)


def integer_humidity(adc_h: int, t_fine: int, cal: bme280.Calibration) -> float:
    """The datasheet's 32-bit integer humidity compensation (result in 1/1024 %RH)."""
    x = t_fine - 76800
    offset_removed = ((adc_h << 14) - (cal.h4 << 20) - cal.h5 * x + 16384) >> 15
    gain = (((((x * cal.h6) >> 10) * (((x * cal.h3) >> 11) + 32768)) >> 10) + 2097152) \
        * cal.h2 + 8192 >> 14
    v = offset_removed * gain
    v -= ((((v >> 15) * (v >> 15)) >> 7) * cal.h1) >> 4
    v = min(max(v, 0), 419430400)
    return (v >> 12) / 1024.0


@EXAMPLES
@given(target_rh=st.floats(1, 99), temperature_c=st.floats(-40, 85),
       h1=st.integers(0, 255), h2=st.integers(200, 500), h3=st.integers(0, 255),
       h4=st.integers(150, 500), h5=st.integers(-50, 100), h6=st.integers(-10, 127))
def test_bme280_humidity_agrees_with_the_integer_formula(
        target_rh: float, temperature_c: float, h1: int, h2: int, h3: int, h4: int, h5: int,
        h6: int) -> None:
    cal = bme280.Calibration(1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, h1, h2, h3, h4, h5, h6)
    t_fine = int(temperature_c * 5120)
    # A raw value near the target humidity (ignoring the small quadratic term).
    x = t_fine - 76800.0
    gain = h2 / 65536.0 * (1.0 + h6 / 67108864.0 * x * (1.0 + h3 / 67108864.0 * x))
    adc_h = min(0xFFFF, max(0, round(h4 * 64.0 + h5 / 16384.0 * x + target_rh / gain)))
    ours_rh = bme280.compensate_humidity(adc_h, t_fine, cal)
    assume(0.5 < ours_rh < 99.5)  # the integer formula clamps outside 0..100
    # Its shifts truncate: a few hundredths of a %RH at most, against the percent-level change
    # the SensorAPI double build's extra H3 factor makes.
    assert integer_humidity(adc_h, t_fine, cal) == pytest.approx(ours_rh, abs=0.03)


# --- INA219 ------------------------------------------------------------------------------------
@EXAMPLES
@given(shunt_ohms=st.sampled_from([0.01, 0.05, 0.1, 0.5, 1.0]),
       current_fraction=st.floats(0.07, 1.0),  # below 0.064 of full scale Cal > 0xFFFF
       bus=u16, shunt=u16, current=u16, power=u16)
def test_ina219_matches_adafruit(shunt_ohms: float, current_fraction: float, bus: int,
                                 shunt: int, current: int, power: int) -> None:
    max_current = 0.32 / shunt_ohms * current_fraction
    cal = ina219.calibration(shunt_ohms, max_current)
    emulated = EmulatedI2CBus("i2c-test")
    regs = emulated.attach(0x40, WordRegisters({1: shunt, 2: bus, 3: power, 4: current}))
    oracle = adafruit_ina219.INA219(BusioOnSmbus(emulated), 0x40)
    # What Adafruit's own set_calibration_* methods do, with our Cal value.
    oracle.calibration = cal.cal
    oracle._current_lsb = 1000 * 0.04096 / (cal.cal * shunt_ohms)
    oracle._power_lsb = 20 * oracle._current_lsb / 1000
    raw = ina219.Ina219IO(emulated, 0x40, "i2c-test").measurement()
    assert isinstance(regs, WordRegisters) and regs.values[ina219.REG_CAL] == cal.cal
    assert oracle.bus_voltage == pytest.approx(ina219.bus_voltage(raw.bus), rel=1e-12)
    assert oracle.shunt_voltage == pytest.approx(ina219.shunt_voltage(raw.shunt), rel=1e-12)
    assert oracle.current / 1000 == pytest.approx(ina219.current(raw.current, cal), rel=1e-12)
    assert oracle.power == pytest.approx(ina219.power(raw.power, cal), rel=1e-12)
    assert oracle.conversion_ready == raw.ready
    assert oracle.overflow == raw.overflow


# --- ADS1115 -----------------------------------------------------------------------------------
ADAFRUIT_GAIN = {6.144: 2 / 3, 4.096: 1, 2.048: 2, 1.024: 4, 0.512: 8, 0.256: 16}
PINS = {"ain0": (0, None), "ain1": (1, None), "ain2": (2, None), "ain3": (3, None),
        "ain0-ain1": (0, 1), "ain0-ain3": (0, 3), "ain1-ain3": (1, 3), "ain2-ain3": (2, 3)}


@EXAMPLES
@given(mux=st.sampled_from(sorted(ads1115.MUX_CODE)),
       pga=st.sampled_from(sorted(ads1115.PGA_CODE)),
       rate=st.sampled_from(sorted(ads1115.DR_CODE)), code=u16)
def test_ads1115_matches_adafruit(mux: str, pga: float, rate: int, code: int) -> None:
    emulated = EmulatedI2CBus("i2c-test")
    regs = emulated.attach(0x48, WordRegisters({0: code, 1: ads1115.CONFIG_POR}))
    oracle = ada_ads1115.ADS1115(BusioOnSmbus(emulated), gain=ADAFRUIT_GAIN[pga],
                                 data_rate=rate, address=0x48)
    positive, negative = PINS[mux]
    volts = AnalogIn(oracle, positive, negative).voltage
    assert isinstance(regs, WordRegisters)
    mux_code, pga_code = ads1115.MUX_CODE[mux], ads1115.PGA_CODE[pga]
    assert regs.values[1] == ads1115.config_word(mux_code, pga_code, ads1115.DR_CODE[rate])
    io = ads1115.Ads1115IO(emulated, 0x48, "i2c-test")
    assert volts == pytest.approx(ads1115.code_to_volts(io.read_conversion(), pga_code),
                                  rel=1e-12, abs=1e-15)


# --- the emulators, read by the independent drivers --------------------------------------------


def build(ctx: BuildContext, module: Any, address: int, **options: Any) -> Any:
    name = module.__name__.rsplit(".", 1)[1]
    cfg = SensorConfig(name=name, driver=name, bus="emulated", address=address, options=options)
    return build_sensor(cfg, ctx)


async def test_adafruit_bme280_reads_the_emulator_like_we_do(ctx: BuildContext) -> None:
    chip = emulated_bus(ctx).attach(0x76, Bme280Emulator())
    assert isinstance(chip, Bme280Emulator)
    chip.pin(18.25, 64.5, 98_765.0)
    sensor = build(ctx, bme280, 0x76)
    await sensor.open()
    mine = {r.quantity: r.value for r in await sensor.sample()}
    oracle = ada_bme280.Adafruit_BME280_I2C(BusioOnSmbus(emulated_bus(ctx)), address=0x76)
    assert abs(oracle.temperature - mine["temperature"]) <= 1 / 5120
    assert oracle.pressure * 100 == pytest.approx(mine["pressure"], rel=1e-12)
    assert oracle.humidity == pytest.approx(mine["humidity"], rel=1e-12)  # this NVM has H3 = 0
    assert mine["temperature"] == pytest.approx(18.25, abs=0.01)


async def test_adafruit_ina219_reads_the_emulator_like_we_do(ctx: BuildContext) -> None:
    chip = emulated_bus(ctx).attach(0x40, Ina219Emulator(shunt_ohms=0.1))
    assert isinstance(chip, Ina219Emulator)
    chip.pin(12.6, 0.8)
    oracle = adafruit_ina219.INA219(BusioOnSmbus(emulated_bus(ctx)), 0x40)  # 32 V, 320 mV
    for _ in range(1000):  # a conversion made with the calibration it just wrote
        if oracle.conversion_ready:
            break
    assert oracle.conversion_ready
    theirs = (oracle.bus_voltage, oracle.current / 1000, oracle.power)
    sensor = build(ctx, ina219, 0x40, shunt_ohms=0.1)
    await sensor.open()
    mine = {r.quantity: r.value for r in await sensor.sample()}
    assert theirs[0] == mine["bus_voltage"] == pytest.approx(12.6)
    assert theirs[1] == pytest.approx(mine["current"], abs=2e-4)
    assert theirs[2] == pytest.approx(mine["power"], abs=5e-3)


async def test_adafruit_ads1115_reads_the_emulator_like_we_do(ctx: BuildContext) -> None:
    chip = emulated_bus(ctx).attach(0x48, Ads1115Emulator())
    assert isinstance(chip, Ads1115Emulator)
    chip.set_input(0, 1.234)
    chip.set_input(1, 0.734)
    oracle = ada_ads1115.ADS1115(BusioOnSmbus(emulated_bus(ctx)), gain=2, address=0x48)
    theirs = AnalogIn(oracle, 0, 1).voltage
    sensor = build(ctx, ads1115, 0x48, channels=[{"mux": "ain0-ain1", "pga": 2.048}])
    await sensor.open()
    (mine,) = await sensor.sample()
    assert theirs == pytest.approx(mine.value, rel=1e-12)
    assert math.isclose(mine.value, 0.5, abs_tol=2.048 / 32768)


def test_register_io_reads_words_big_endian() -> None:
    emulated = EmulatedI2CBus()
    emulated.attach(0x41, WordRegisters({2: 0x2592}))
    assert RegisterIO(emulated, 0x41, "x").read_u16_be(2) == 0x2592
