"""Bosch BME280: temperature (degC), relative humidity (%RH) and pressure (Pa) over I2C.

Layers: pure decoding and compensation (no I/O) -> ``Bme280IO`` (blocking register transfers on
any smbus2-compatible bus) -> ``Bme280Sensor`` (async, on the bus worker) -> ``build``.

Registers (datasheet section 5.3)::

    0x88..0xA1  calibration T1..T3, P1..P9 (little-endian), 0xA1 = H1
    0xD0 id (0x60)      0xE0 reset (write 0xB6)      0xE1..0xE7 calibration H2..H6
    0xF2 ctrl_hum [osrs_h:3]                         (latched by the next ctrl_meas write)
    0xF3 status   [measuring:bit3] [im_update:bit0]
    0xF4 ctrl_meas [osrs_t:3][osrs_p:3][mode:2]      mode 00 sleep, 01 forced, 11 normal
    0xF5 config   [t_sb:3][filter:3][-][spi3w]       (writes may be ignored in normal mode)
    0xF7..0xFE    press[19:0], temp[19:0], hum[15:0] (MSB first; burst-read for consistency)

Options (``[sensors.options]``): ``mode`` ("forced", default, one measurement per period, the
chip sleeps in between; or "normal", the chip measures continuously), ``oversampling_t``
(1..16), ``oversampling_p`` and ``oversampling_h`` (0 = skip, 1..16), ``filter`` (IIR
coefficient 0, 2, 4, 8, 16) and ``standby_ms`` (normal mode only).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from agent.clock import Clock
from agent.quality import OUT_OF_RANGE
from agent.readings import Reading
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady, ProtocolError
from drivers.i2c.bus import AsyncI2CBus
from drivers.i2c.regio import RegisterIO, hex8
from drivers.i2c.sensor import I2CSensor, bus_for, parse_options

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = 0x76
REG_CALIB_TP = 0x88  # 26 bytes, 0x88..0xA1
REG_CALIB_H = 0xE1  # 7 bytes, 0xE1..0xE7
REG_CHIP_ID = 0xD0
REG_RESET = 0xE0
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # 8 bytes, 0xF7..0xFE
REG_TEMP_DATA = 0xFA
REG_HUM_DATA = 0xFD
CALIB_TP_LEN = 26
CALIB_H_LEN = 7
DATA_LEN = 8

CHIP_ID_BME280 = 0x60
OTHER_CHIPS = {0x56: "BMP280 (sample)", 0x57: "BMP280 (sample)", 0x58: "BMP280",
               0x61: "BME680"}
RESET_WORD = 0xB6
STATUS_MEASURING = 0x08
STATUS_IM_UPDATE = 0x01
MODE_SLEEP, MODE_FORCED, MODE_NORMAL = 0b00, 0b01, 0b11

SKIPPED_TP = 0x80000  # a skipped (or not yet measured) 20-bit temperature/pressure
SKIPPED_H = 0x8000  # a skipped 16-bit humidity

STARTUP_S = 0.002  # datasheet t_startup: NVM copy after power-on or soft reset
NVM_POLL_S = 0.001
NVM_POLL_ATTEMPTS = 20
STATUS_POLL_S = 0.001

# Datasheet section 3.3: codes for oversampling, IIR filter and standby.
OVERSAMPLING_CODE = {0: 0, 1: 1, 2: 2, 4: 3, 8: 4, 16: 5}
FILTER_CODE = {0: 0, 2: 1, 4: 2, 8: 3, 16: 4}
STANDBY_CODE = {0.5: 0, 62.5: 1, 125.0: 2, 250.0: 3, 500.0: 4, 1000.0: 5, 10.0: 6, 20.0: 7}

# Operating range (datasheet table 1); readings outside are flagged, not clamped.
TEMPERATURE_RANGE_C = (-40.0, 85.0)
PRESSURE_RANGE_PA = (30_000.0, 110_000.0)
HUMIDITY_RANGE_RH = (0.0, 100.0)


# --- pure decoding -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Calibration:
    """Trimming parameters from the chip's NVM (datasheet table 16)."""

    t1: int
    t2: int
    t3: int
    p1: int
    p2: int
    p3: int
    p4: int
    p5: int
    p6: int
    p7: int
    p8: int
    p9: int
    h1: int
    h2: int
    h3: int
    h4: int
    h5: int
    h6: int


def _s8(b: int) -> int:
    return b - 0x100 if b & 0x80 else b


def parse_calibration(tp: bytes, hum: bytes) -> Calibration:
    """Calibration from registers 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7 bytes).

    H4 and H5 are 12-bit values that share register 0xE5: H4 = 0xE4 (signed) * 16 + the low
    nibble of 0xE5, H5 = 0xE6 (signed) * 16 + the high nibble of 0xE5.
    """
    if len(tp) != CALIB_TP_LEN or len(hum) != CALIB_H_LEN:
        raise ValueError(f"calibration needs {CALIB_TP_LEN} + {CALIB_H_LEN} bytes, "
                         f"got {len(tp)} + {len(hum)}")
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack_from("<HhhHhhhhhhhh", tp)
    (h2,) = struct.unpack_from("<h", hum)
    e5 = hum[4]
    return Calibration(
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9,
        h1=tp[25],
        h2=h2,
        h3=hum[2],
        h4=(_s8(hum[3]) * 16) | (e5 & 0x0F),
        h5=(_s8(hum[5]) * 16) | (e5 >> 4),
        h6=_s8(hum[6]),
    )


@dataclass(frozen=True, slots=True)
class RawSample:
    adc_p: int
    adc_t: int
    adc_h: int


def parse_raw(data: bytes) -> RawSample:
    """The 8 data bytes 0xF7..0xFE: 20-bit pressure and temperature, 16-bit humidity."""
    if len(data) != DATA_LEN:
        raise ValueError(f"raw data needs {DATA_LEN} bytes, got {len(data)}")
    adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
    adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
    adc_h = (data[6] << 8) | data[7]
    return RawSample(adc_p, adc_t, adc_h)


# Compensation: the double-precision formulas of the BME280 datasheet (section 8.1,
# "Compensation formulas in double precision floating point"), which are also what Bosch's
# BME280_SensorAPI builds with BME280_DOUBLE_ENABLE. t_fine is the datasheet's (int32) cast of
# var1 + var2, i.e. truncation toward zero, and is what pressure and humidity use; the
# temperature itself is (var1 + var2) / 5120 without that truncation. Unlike the SensorAPI the
# results are not clamped to the operating range: the sensor flags such readings instead, so a
# failing chip shows up as out_of_range rather than as a plausible limit value.
#
# Humidity follows the datasheet's double formula, which agrees with the integer formula of
# both the datasheet and the SensorAPI. The SensorAPI's double build (and ports of it) multiply
# by one more factor (1 + dig_H3 / 2^26 * (t_fine - 76800)); the two agree whenever dig_H3 = 0.


def compensate_temperature(adc_t: int, cal: Calibration) -> tuple[float, int]:
    """(temperature in degC, t_fine)."""
    d1 = adc_t / 16384.0 - cal.t1 / 1024.0
    d2 = adc_t / 131072.0 - cal.t1 / 8192.0
    fine = d1 * cal.t2 + d2 * d2 * cal.t3
    return fine / 5120.0, int(fine)


def compensate_pressure(adc_p: int, t_fine: int, cal: Calibration) -> float | None:
    """Pressure in Pa, or None where the formula divides by zero (a broken calibration)."""
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * cal.p6 / 32768.0 + v1 * cal.p5 * 2.0
    v2 = v2 / 4.0 + cal.p4 * 65536.0
    v1 = (cal.p3 * v1 * v1 / 524288.0 + cal.p2 * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * cal.p1
    if v1 == 0.0:
        return None
    p = (1048576.0 - adc_p - v2 / 4096.0) * 6250.0 / v1
    return p + (cal.p9 * p * p / 2147483648.0 + p * cal.p8 / 32768.0 + cal.p7) / 16.0


def compensate_humidity(adc_h: int, t_fine: int, cal: Calibration) -> float:
    """Relative humidity in %RH (not clamped to 0..100)."""
    x = t_fine - 76800.0
    offset = cal.h4 * 64.0 + cal.h5 / 16384.0 * x
    gain = (cal.h2 / 65536.0) * (1.0 + cal.h6 / 67108864.0 * x
                                 * (1.0 + cal.h3 / 67108864.0 * x))
    h = (adc_h - offset) * gain
    return h * (1.0 - cal.h1 * h / 524288.0)


def measurement_time_max_s(osr_t: int, osr_p: int, osr_h: int) -> float:
    """Worst-case measurement time for oversampling factors (0 = skipped), datasheet 9.1."""
    us = 1250.0 + 2300.0 * osr_t
    if osr_p:
        us += 2300.0 * osr_p + 575.0
    if osr_h:
        us += 2300.0 * osr_h + 575.0
    return us / 1e6


def measurement_time_typ_s(osr_t: int, osr_p: int, osr_h: int) -> float:
    """Typical measurement time, datasheet 9.1."""
    ms = 1.0 + 2.0 * osr_t
    if osr_p:
        ms += 2.0 * osr_p + 0.5
    if osr_h:
        ms += 2.0 * osr_h + 0.5
    return ms / 1000.0


def describe_chip_id(chip_id: int) -> str:
    if chip_id == CHIP_ID_BME280:
        return "BME280"
    return OTHER_CHIPS.get(chip_id, "unknown device")


# --- options -----------------------------------------------------------------------------------
class Bme280Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["forced", "normal"] = "forced"
    oversampling_t: Literal[1, 2, 4, 8, 16] = 1  # temperature feeds P and H: never skipped
    oversampling_p: Literal[0, 1, 2, 4, 8, 16] = 1
    oversampling_h: Literal[0, 1, 2, 4, 8, 16] = 1
    filter: Literal[0, 2, 4, 8, 16] = 0
    standby_ms: float = 1000.0

    @field_validator("standby_ms")
    @classmethod
    def _standby(cls, v: float) -> float:
        if v not in STANDBY_CODE:
            allowed = ", ".join(f"{k:g}" for k in sorted(STANDBY_CODE))
            raise ValueError(f"{v:g} is not a standby time the chip has ({allowed} ms)")
        return v

    def ctrl_hum(self) -> int:
        return OVERSAMPLING_CODE[self.oversampling_h]

    def ctrl_meas(self, mode: int) -> int:
        return ((OVERSAMPLING_CODE[self.oversampling_t] << 5)
                | (OVERSAMPLING_CODE[self.oversampling_p] << 2) | mode)

    def config(self) -> int:
        standby = STANDBY_CODE[self.standby_ms] if self.mode == "normal" else 0
        return (standby << 5) | (FILTER_CODE[self.filter] << 2)

    def max_time_s(self) -> float:
        return measurement_time_max_s(self.oversampling_t, self.oversampling_p,
                                      self.oversampling_h)


# --- I/O shell ---------------------------------------------------------------------------------
class Bme280IO(RegisterIO):
    """Blocking register operations; each is one or a few bus transfers."""

    def chip_id(self) -> int:
        return self.read_u8(REG_CHIP_ID)

    def soft_reset(self) -> None:
        self.write_u8(REG_RESET, RESET_WORD)

    def nvm_copied(self) -> bool:
        return not self.read_u8(REG_STATUS) & STATUS_IM_UPDATE

    def measurement_done(self) -> bool:
        return not self.read_u8(REG_STATUS) & STATUS_MEASURING

    def read_calibration(self) -> tuple[bytes, bytes]:
        return self.read_block(REG_CALIB_TP, CALIB_TP_LEN), self.read_block(REG_CALIB_H,
                                                                            CALIB_H_LEN)

    def configure(self, ctrl_hum: int, config: int, ctrl_meas: int) -> None:
        """ctrl_hum first (it only takes effect on the next ctrl_meas write), config while the
        chip still sleeps (normal mode may ignore it), ctrl_meas last."""
        self.write_u8(REG_CTRL_HUM, ctrl_hum)
        self.write_u8(REG_CONFIG, config)
        self.write_u8(REG_CTRL_MEAS, ctrl_meas)

    def start(self, ctrl_meas: int) -> None:
        self.write_u8(REG_CTRL_MEAS, ctrl_meas)

    def read_data(self) -> bytes:
        """Burst read so the chip's shadowing keeps T, P and H from one measurement."""
        return self.read_block(REG_DATA, DATA_LEN)


# --- sensor ------------------------------------------------------------------------------------
def _range_reasons(value: float, bounds: tuple[float, float]) -> tuple[str, ...]:
    lo, hi = bounds
    return () if lo <= value <= hi and math.isfinite(value) else (OUT_OF_RANGE,)


class Bme280Sensor(I2CSensor):
    def __init__(self, name: str, clock: Clock, period_s: float, *, bus: AsyncI2CBus,
                 address: int, timeout_s: float, options: Bme280Options) -> None:
        super().__init__(name, clock, period_s, bus=bus, address=address, timeout_s=timeout_s)
        self.options = options
        self.calibration: Calibration | None = None
        self._io = Bme280IO(bus.handle, address, bus.label)

    async def open(self) -> None:
        self.calibration = None
        io, opt = self._io, self.options
        await self.bus.open(self.timeout_s)
        chip_id = await self.io(io.chip_id)
        if chip_id != CHIP_ID_BME280:
            raise ConfigurationError(
                f"chip id {hex8(chip_id)} is a {describe_chip_id(chip_id)}, not a BME280 "
                f"({hex8(CHIP_ID_BME280)})" + (": it has no humidity sensor"
                                                if chip_id in (0x56, 0x57, 0x58) else ""),
                where=io.where(REG_CHIP_ID))
        await self.io(io.soft_reset)
        await self.poll(io.nvm_copied, first_wait_s=STARTUP_S, interval_s=NVM_POLL_S,
                        attempts=NVM_POLL_ATTEMPTS, what="NVM copy after soft reset (im_update)")
        tp, hum = await self.io(io.read_calibration)
        if tp in (bytes(CALIB_TP_LEN), b"\xff" * CALIB_TP_LEN):
            raise ProtocolError("calibration reads blank", where=io.where(REG_CALIB_TP))
        cal = parse_calibration(tp, hum)
        if cal.t1 == 0 or cal.p1 == 0:
            raise ProtocolError(f"calibration is invalid (dig_T1={cal.t1}, dig_P1={cal.p1})",
                                where=io.where(REG_CALIB_TP))
        await self.io(io.configure, opt.ctrl_hum(), opt.config(), opt.ctrl_meas(MODE_SLEEP))
        if opt.mode == "normal":
            await self.io(io.start, opt.ctrl_meas(MODE_NORMAL))
            # The status bit toggles with every cycle in normal mode, so it cannot say when
            # the first result is in; the worst-case measurement time can.
            await asyncio.sleep(opt.max_time_s())
        self.calibration = cal
        log.debug("%s: BME280 ready at %s: %s", self.name, self.where, opt)

    def _status_attempts(self) -> int:
        # Poll for as long again as the worst-case time, at least a few times.
        return max(5, math.ceil(self.options.max_time_s() / STATUS_POLL_S))

    async def sample(self) -> Sequence[Reading]:
        cal = self.calibration
        if cal is None:
            raise DeviceNotReady("not open", where=self.where)
        io, opt = self._io, self.options
        if opt.mode == "forced":
            await self.io(io.start, opt.ctrl_meas(MODE_FORCED))
            await self.poll(io.measurement_done, first_wait_s=opt.max_time_s(),
                            interval_s=STATUS_POLL_S, attempts=self._status_attempts(),
                            what="forced measurement (status.measuring)")
        raw = parse_raw(await self.io(io.read_data))
        return self.readings(raw, cal)

    def readings(self, raw: RawSample, cal: Calibration) -> list[Reading]:
        """Readings from one raw sample. A skip marker for a quantity the config measures
        raises: the chip lost its settings (a reset) and must be opened again."""
        opt = self.options
        if raw.adc_t == SKIPPED_TP:
            raise self._lost_settings("temperature", "0x80000", REG_TEMP_DATA)
        temperature, t_fine = compensate_temperature(raw.adc_t, cal)
        out = [self.reading("temperature", temperature, "degC",
                            _range_reasons(temperature, TEMPERATURE_RANGE_C))]
        if opt.oversampling_p:
            if raw.adc_p == SKIPPED_TP:
                raise self._lost_settings("pressure", "0x80000", REG_DATA)
            pressure = compensate_pressure(raw.adc_p, t_fine, cal)
            if pressure is None:
                raise ProtocolError("pressure compensation undefined (calibration corrupt?)",
                                    where=self._io.where(REG_CALIB_TP))
            out.append(self.reading("pressure", pressure, "Pa",
                                    _range_reasons(pressure, PRESSURE_RANGE_PA)))
        if opt.oversampling_h:
            if raw.adc_h == SKIPPED_H:
                raise self._lost_settings("humidity", "0x8000", REG_HUM_DATA)
            humidity = compensate_humidity(raw.adc_h, t_fine, cal)
            out.append(self.reading("humidity", humidity, "%RH",
                                    _range_reasons(humidity, HUMIDITY_RANGE_RH)))
        for r in out:
            if r.reasons:
                self.count("out_of_range")
        return out

    def _lost_settings(self, quantity: str, marker: str, register: int) -> ProtocolError:
        self.count("lost_settings")
        return ProtocolError(f"{quantity} reads {marker} (skipped) although it is measured: "
                             f"the chip lost its settings (reset?)",
                             where=self._io.where(register))


def build(cfg: Any, ctx: BuildContext) -> Bme280Sensor:
    """``cfg`` is a SensorConfig with ``driver = "bme280"``."""
    options = parse_options(Bme280Options, cfg.options, sensor=cfg.name)
    bus, address = bus_for(cfg, ctx, DEFAULT_ADDRESS)
    return Bme280Sensor(cfg.name, ctx.clock, cfg.period_s, bus=bus, address=address,
                        timeout_s=cfg.timeout_s, options=options)
