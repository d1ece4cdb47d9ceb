"""TI INA219: bus voltage (V), shunt voltage (V), current (A) and power (W) over I2C.

Layers: pure decoding and calibration maths -> ``Ina219IO`` (blocking transfers on any
smbus2-compatible bus) -> ``Ina219Sensor`` (async, on the bus worker) -> ``build``.

Registers, 16-bit big-endian (datasheet section 8.6)::

    00 config   [RST:15][-][BRNG:13][PG:12..11][BADC:10..7][SADC:6..3][MODE:2..0]  reset 0x399F
    01 shunt    signed, 10 uV/bit (saturates at the PG range)
    02 bus      [BD:15..3] 4 mV/bit, [CNVR:1] conversion ready, [OVF:0] math overflow
    03 power    power_LSB = 20 * current_LSB (reading it clears CNVR)
    04 current  signed, current_LSB per bit
    05 cal      [FS:15..1], bit 0 always reads 0; zero after power-on: current/power read 0

Options: ``shunt_ohms`` (0.1), ``max_current_a`` (default: the shunt range / shunt_ohms),
``bus_range_v`` (16 or 32, default 32), ``shunt_range_mv`` (40/80/160/320, default the
smallest that holds max_current_a), ``averaging`` (samples per conversion, 1..128).

A load spike can brown the chip out: it comes back with the power-on config and calibration 0
and then reads zero current. Every sample reads config and calibration back first; on a
mismatch it re-writes them, counts ``resets`` and waits for a conversion made with them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.clock import Clock
from agent.quality import OVERFLOW
from agent.readings import Reading
from drivers.base import BuildContext, DeviceNotReady, ProtocolError
from drivers.i2c.bus import AsyncI2CBus
from drivers.i2c.regio import RegisterIO, hex16, to_s16
from drivers.i2c.sensor import I2CSensor, bus_for, parse_options

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = 0x40
REG_CONFIG, REG_SHUNT, REG_BUS, REG_POWER, REG_CURRENT, REG_CAL = range(6)
CONFIG_RESET = 0x8000  # RST bit
CONFIG_POR = 0x399F  # value after power-on or reset
BUS_CNVR = 0x0002
BUS_OVF = 0x0001
SHUNT_LSB_V = 10e-6
BUS_LSB_V = 0.004
CAL_SCALE = 0.04096  # datasheet equation 1, fixed by the chip's internal scaling
MODE_CONTINUOUS = 0b111  # shunt and bus, continuous

PG_CODE = {40: 0, 80: 1, 160: 2, 320: 3}  # shunt full scale (mV) -> PG
BRNG_CODE = {16: 0, 32: 1}
# ADC setting code -> conversion time in seconds (datasheet table 8.6.2.1, 12-bit and averaged)
ADC_CODE = {1: 0b0011, 2: 0b1001, 4: 0b1010, 8: 0b1011, 16: 0b1100, 32: 0b1101, 64: 0b1110,
            128: 0b1111}
CONVERSION_S = {0b0000: 84e-6, 0b0001: 148e-6, 0b0010: 276e-6, 0b0011: 532e-6,
                0b1000: 532e-6, 0b1001: 1.06e-3, 0b1010: 2.13e-3, 0b1011: 4.26e-3,
                0b1100: 8.51e-3, 0b1101: 17.02e-3, 0b1110: 34.05e-3, 0b1111: 68.10e-3}
CONVERSION_POLLS = 10


# --- pure decoding -----------------------------------------------------------------------------
def adc_conversion_s(code: int) -> float:
    """Conversion time of one BADC/SADC setting; codes 01xx behave like 00xx."""
    return CONVERSION_S[code if code & 0b1000 else code & 0b0011]


def config_conversion_s(config: int) -> float:
    """Time for one bus plus one shunt conversion under ``config``."""
    return adc_conversion_s((config >> 7) & 0xF) + adc_conversion_s((config >> 3) & 0xF)


@dataclass(frozen=True, slots=True)
class Calibration:
    """The calibration register value and the current LSB it really gives.

    The datasheet picks Current_LSB = Imax / 2^15 and Cal = trunc(0.04096 / (Current_LSB *
    R)). The chip then computes current = shunt * Cal / 4096, so the current one count stands
    for is 0.04096 / (Cal * R): that (``current_lsb``) is what readings are scaled by. It
    differs from Imax / 2^15 by the truncation (and by bit 0 of Cal, which the register does
    not hold), under 1/Cal relative.
    """

    cal: int
    current_lsb_a: float

    @property
    def power_lsb_w(self) -> float:
        return 20.0 * self.current_lsb_a


def calibration(shunt_ohms: float, max_current_a: float) -> Calibration:
    nominal_lsb = max_current_a / 32768.0
    cal = math.trunc(CAL_SCALE / (nominal_lsb * shunt_ohms))
    if not 2 <= cal <= 0xFFFF:
        raise ValueError(f"calibration {cal} does not fit the register (2..65534): "
                         f"max_current_a={max_current_a:g} is too "
                         f"{'small' if cal > 0xFFFF else 'large'} for shunt_ohms={shunt_ohms:g}")
    cal &= 0xFFFE
    return Calibration(cal, CAL_SCALE / (cal * shunt_ohms))


def bus_voltage(reg: int) -> float:
    return (reg >> 3) * BUS_LSB_V


def shunt_voltage(reg: int) -> float:
    return to_s16(reg) * SHUNT_LSB_V


def current(reg: int, cal: Calibration) -> float:
    return to_s16(reg) * cal.current_lsb_a


def power(reg: int, cal: Calibration) -> float:
    return reg * cal.power_lsb_w


def shunt_saturated(reg: int, shunt_range_mv: int) -> bool:
    return abs(to_s16(reg)) >= shunt_range_mv * 100


# --- options -----------------------------------------------------------------------------------
class Ina219Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shunt_ohms: float = Field(default=0.1, gt=0, le=1000)
    max_current_a: float | None = Field(default=None, gt=0)
    bus_range_v: Literal[16, 32] = 32
    shunt_range_mv: Literal[40, 80, 160, 320] | None = None
    averaging: Literal[1, 2, 4, 8, 16, 32, 64, 128] = 1

    @model_validator(mode="after")
    def _fits(self) -> Ina219Options:
        calibration(self.shunt_ohms, self.max_current())
        needed_mv = self.max_current() * self.shunt_ohms * 1000
        if self.range_mv() < needed_mv - 1e-9:
            raise ValueError(f"max_current_a={self.max_current():g} through "
                             f"{self.shunt_ohms:g} ohm drops {needed_mv:g} mV, beyond the "
                             f"{'largest ' if self.shunt_range_mv is None else ''}shunt range "
                             f"({self.range_mv()} mV)")
        return self

    def max_current(self) -> float:
        if self.max_current_a is not None:
            return self.max_current_a
        return (self.shunt_range_mv or 320) / 1000 / self.shunt_ohms

    def range_mv(self) -> int:
        if self.shunt_range_mv is not None:
            return self.shunt_range_mv
        needed_mv = self.max_current() * self.shunt_ohms * 1000
        return next((mv for mv in PG_CODE if mv >= needed_mv - 1e-9), 320)

    def config(self) -> int:
        adc = ADC_CODE[self.averaging]
        return ((BRNG_CODE[self.bus_range_v] << 13) | (PG_CODE[self.range_mv()] << 11)
                | (adc << 7) | (adc << 3) | MODE_CONTINUOUS)

    def calibration(self) -> Calibration:
        return calibration(self.shunt_ohms, self.max_current())


# --- I/O shell ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RawMeasurement:
    bus: int
    shunt: int
    current: int
    power: int

    @property
    def ready(self) -> bool:
        return bool(self.bus & BUS_CNVR)

    @property
    def overflow(self) -> bool:
        return bool(self.bus & BUS_OVF)


class Ina219IO(RegisterIO):
    def reset(self) -> None:
        self.write_u16_be(REG_CONFIG, CONFIG_RESET)

    def configure(self, config: int, cal: int) -> None:
        self.write_u16_be(REG_CONFIG, config)
        self.write_u16_be(REG_CAL, cal)

    def settings(self) -> tuple[int, int]:
        """(config, calibration) as the chip holds them now."""
        return self.read_u16_be(REG_CONFIG), self.read_u16_be(REG_CAL)

    def conversion_ready(self) -> bool:
        return bool(self.read_u16_be(REG_BUS) & BUS_CNVR)

    def measurement(self) -> RawMeasurement:
        """Bus first (CNVR and OVF describe the values read after it); power last, because
        reading it clears CNVR."""
        bus = self.read_u16_be(REG_BUS)
        shunt = self.read_u16_be(REG_SHUNT)
        cur = self.read_u16_be(REG_CURRENT)
        pwr = self.read_u16_be(REG_POWER)
        return RawMeasurement(bus, shunt, cur, pwr)


# --- sensor ------------------------------------------------------------------------------------
class Ina219Sensor(I2CSensor):
    def __init__(self, name: str, clock: Clock, period_s: float, *, bus: AsyncI2CBus,
                 address: int, timeout_s: float, options: Ina219Options) -> None:
        super().__init__(name, clock, period_s, bus=bus, address=address, timeout_s=timeout_s)
        self.options = options
        self.config = options.config()
        self.cal = options.calibration()
        self.conversion_s = config_conversion_s(self.config)
        self._io = Ina219IO(bus.handle, address, bus.label)
        self._open = False

    async def open(self) -> None:
        self._open = False
        io = self._io
        await self.bus.open(self.timeout_s)
        await self.io(io.reset)
        await self.io(io.configure, self.config, self.cal.cal)
        config, cal = await self.io(io.settings)
        if (config, cal) != (self.config, self.cal.cal):
            raise ProtocolError(f"settings read back as config={hex16(config)} "
                                f"cal={hex16(cal)} after writing {hex16(self.config)}/"
                                f"{hex16(self.cal.cal)}: is this an INA219?",
                                where=io.where(REG_CAL))
        await self._wait_conversion()
        self._open = True
        log.debug("%s: INA219 ready at %s (config %s, cal %d, %.3g A/bit)", self.name,
                  self.where, hex16(self.config), self.cal.cal, self.cal.current_lsb_a)

    async def _wait_conversion(self) -> None:
        await self.poll(self._io.conversion_ready, first_wait_s=self.conversion_s,
                        interval_s=self.conversion_s / 2, attempts=CONVERSION_POLLS,
                        what="conversion (CNVR)")

    async def sample(self) -> Sequence[Reading]:
        if not self._open:
            raise DeviceNotReady("not open", where=self.where)
        io = self._io
        config, cal = await self.io(io.settings)
        if (config, cal) != (self.config, self.cal.cal):
            self.count("resets")
            log.warning("%s: %s lost its settings (config=%s cal=%s%s); re-writing them",
                        self.name, self.where, hex16(config), hex16(cal),
                        ", power-on values: brown-out?" if config == CONFIG_POR and cal == 0
                        else "")
            await self.io(io.configure, self.config, self.cal.cal)
            await self._wait_conversion()
        raw = await self.io(io.measurement)
        if not raw.ready:
            await self._wait_conversion()
            raw = await self.io(io.measurement)
        return self.readings(raw)

    def readings(self, raw: RawMeasurement) -> list[Reading]:
        """Readings from one measurement; shunt, current and power are flagged ``overflow``
        when the chip's maths overflowed or the shunt voltage sits at the end of its range."""
        bad = raw.overflow or shunt_saturated(raw.shunt, self.options.range_mv())
        reasons: tuple[str, ...] = (OVERFLOW,) if bad else ()
        if bad:
            self.count("overflow")
        return [
            self.reading("bus_voltage", bus_voltage(raw.bus), "V"),
            self.reading("shunt_voltage", shunt_voltage(raw.shunt), "V", reasons),
            self.reading("current", current(raw.current, self.cal), "A", reasons),
            self.reading("power", power(raw.power, self.cal), "W", reasons),
        ]


def build(cfg: Any, ctx: BuildContext) -> Ina219Sensor:
    """``cfg`` is a SensorConfig with ``driver = "ina219"``."""
    options = parse_options(Ina219Options, cfg.options, sensor=cfg.name)
    bus, address = bus_for(cfg, ctx, DEFAULT_ADDRESS)
    return Ina219Sensor(cfg.name, ctx.clock, cfg.period_s, bus=bus, address=address,
                        timeout_s=cfg.timeout_s, options=options)
