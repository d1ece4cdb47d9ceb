"""A BME280 at register level: chip id, soft reset with NVM copy, calibration, forced and
normal mode with measurement timing and status bits, and a daily weather cycle.

The environment (temperature, humidity, pressure) comes from ``environment(env_time())``; the
raw ADC codes the chip reports are found by inverting the driver's compensation against this
chip's calibration, so a correct driver reads back the environment to within ADC resolution.
The IIR filter setting is stored but not applied.

Time: ``clock`` (monotonic seconds) times the NVM copy and the measurements, at the datasheet's
typical durations; ``env_time`` (epoch seconds) drives the weather. Both are injectable.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

from drivers.base import BuildContext
from drivers.emulated.i2c_bus import EmulatedChip, TimeFn
from drivers.emulated.i2c_setup import attach
from drivers.i2c.bme280 import (
    CHIP_ID_BME280,
    DEFAULT_ADDRESS,
    MODE_FORCED,
    MODE_NORMAL,
    MODE_SLEEP,
    REG_CALIB_H,
    REG_CALIB_TP,
    REG_CHIP_ID,
    REG_CONFIG,
    REG_CTRL_HUM,
    REG_CTRL_MEAS,
    REG_DATA,
    REG_RESET,
    REG_STATUS,
    RESET_WORD,
    SKIPPED_H,
    SKIPPED_TP,
    STANDBY_CODE,
    STATUS_IM_UPDATE,
    STATUS_MEASURING,
    Calibration,
    compensate_humidity,
    compensate_pressure,
    compensate_temperature,
    measurement_time_typ_s,
    parse_calibration,
)

Environment = Callable[[float], tuple[float, float, float]]  # t -> (degC, %RH, Pa)

# Temperature/pressure trimming of the BMP280 datasheet's worked example (section 3.12), then
# the unused 0xA0 and H1; humidity trimming (0xE1..0xE7) typical of production parts:
# H2=362, H3=0, H4=313, H5=50, H6=30.
DEFAULT_NVM_TP = bytes.fromhex("706B436718FC7D8E43D6D00B270B8C00F9FF8C3CF8C67017") + bytes((0, 75))
DEFAULT_NVM_H = bytes((0x6A, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1E))
NVM_COPY_S = 0.001  # shorter than the 2 ms start-up time the driver waits
OSR_FACTOR = (0, 1, 2, 4, 8, 16, 16, 16)  # code -> oversampling factor
STANDBY_S = {code: ms / 1000.0 for ms, code in STANDBY_CODE.items()}
DAY_S = 86_400.0


def daily_weather(t: float) -> tuple[float, float, float]:
    """A plausible day: coolest near 03:00 and warmest near 15:00 (UTC of ``t``), humidity
    moving against temperature, pressure drifting over days with a small twice-daily tide."""
    diurnal = math.sin(2 * math.pi * ((t % DAY_S) / DAY_S - 9 / 24))
    ripple = math.sin(2 * math.pi * t / 1800.0)
    temperature = 14.0 + 7.0 * diurnal + 0.3 * ripple
    humidity = min(98.0, max(5.0, 62.0 - 22.0 * diurnal - 1.5 * ripple))
    pressure = (101_325.0 + 800.0 * math.sin(2 * math.pi * t / (4.3 * DAY_S))
                + 60.0 * math.sin(4 * math.pi * (t % DAY_S) / DAY_S))
    return temperature, humidity, pressure


def _invert(f: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """The integer x in [lo, hi] where the monotonic f(x) is closest to target."""
    rising = f(hi) >= f(lo)
    a, b = lo, hi
    while b - a > 1:
        mid = (a + b) // 2
        if (f(mid) < target) == rising:
            a = mid
        else:
            b = mid
    return a if abs(f(a) - target) <= abs(f(b) - target) else b


class Bme280Emulator(EmulatedChip):
    kind = "bme280"

    def __init__(self, *, clock: TimeFn = time.monotonic, env_time: TimeFn = time.time,
                 environment: Environment = daily_weather, chip_id: int = CHIP_ID_BME280,
                 nvm_tp: bytes = DEFAULT_NVM_TP, nvm_h: bytes = DEFAULT_NVM_H,
                 noise: bool = True, seed: int = 280) -> None:
        super().__init__(clock)
        self.env_time = env_time
        self.environment = environment
        self.chip_id = chip_id
        self.nvm_tp = nvm_tp
        self.nvm_h = nvm_h
        self.calibration: Calibration = parse_calibration(nvm_tp, nvm_h)
        self.noise = noise
        self._rng = random.Random(seed)
        self.regs = bytearray(256)
        self.pointer = 0
        self.ignored_config_writes = 0
        self.measurements = 0
        self._osrs_h = 0  # ctrl_hum as latched by the last ctrl_meas write
        self._nvm_until = 0.0
        self._meas_until: float | None = None
        self._normal_since: float | None = None
        self._normal_done = 0
        self.power_on_reset()

    # --- test and demo hooks ---------------------------------------------------------------
    def pin(self, temperature: float, humidity: float, pressure: float) -> None:
        """Hold the environment at fixed values, without noise."""
        with self.lock:
            self.environment = lambda t: (temperature, humidity, pressure)
            self.noise = False

    @property
    def mode(self) -> int:
        return self.regs[REG_CTRL_MEAS] & 0x03

    # --- chip behaviour --------------------------------------------------------------------
    def power_on_reset(self) -> None:
        now = self.clock()
        self.regs[:] = bytes(256)
        self.regs[REG_CALIB_TP:REG_CALIB_TP + len(self.nvm_tp)] = self.nvm_tp
        self.regs[REG_CALIB_H:REG_CALIB_H + len(self.nvm_h)] = self.nvm_h
        self.regs[REG_CHIP_ID] = self.chip_id
        self.regs[REG_DATA:REG_DATA + 8] = bytes((0x80, 0, 0, 0x80, 0, 0, 0x80, 0))
        self._osrs_h = 0
        self._nvm_until = now + NVM_COPY_S
        self._meas_until = None
        self._normal_since = None
        self._normal_done = 0

    def _t_measure(self) -> float:
        ctrl = self.regs[REG_CTRL_MEAS]
        return measurement_time_typ_s(OSR_FACTOR[ctrl >> 5], OSR_FACTOR[(ctrl >> 2) & 7],
                                      OSR_FACTOR[self._osrs_h])

    def _cycle(self) -> float:
        return self._t_measure() + STANDBY_S[self.regs[REG_CONFIG] >> 5]

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0]
        # Multi-byte writes are register/value pairs on this chip (no auto-increment on write).
        for i in range(0, len(data) - 1, 2):
            self._write_register(data[i], data[i + 1])

    def _write_register(self, reg: int, value: int) -> None:
        self._update()
        now = self.clock()
        if reg == REG_RESET:
            if value == RESET_WORD:
                self.power_on_reset()
        elif reg == REG_CTRL_HUM:
            self.regs[reg] = value & 0x07
        elif reg == REG_CONFIG:
            if self.mode == MODE_NORMAL:
                self.ignored_config_writes += 1
            else:
                self.regs[reg] = value & 0xFD
        elif reg == REG_CTRL_MEAS:
            self.regs[reg] = value
            self._osrs_h = self.regs[REG_CTRL_HUM]
            mode = value & 0x03
            self._meas_until = None
            self._normal_since = None
            if mode in (MODE_FORCED, 0b10):
                self._meas_until = now + self._t_measure()
            elif mode == MODE_NORMAL:
                self._normal_since = now
                self._normal_done = 0

    def _status(self, now: float) -> int:
        status = STATUS_IM_UPDATE if now < self._nvm_until else 0
        if self._meas_until is not None and now < self._meas_until:
            status |= STATUS_MEASURING
        if self._normal_since is not None and (now - self._normal_since) % self._cycle() \
                < self._t_measure():
            status |= STATUS_MEASURING
        return status

    def _update(self) -> None:
        now = self.clock()
        if self._meas_until is not None and now >= self._meas_until:
            self._meas_until = None
            self._measure()
            self.regs[REG_CTRL_MEAS] = (self.regs[REG_CTRL_MEAS] & ~0x03) | MODE_SLEEP
        if self._normal_since is not None:
            done = math.floor((now - self._normal_since - self._t_measure()) / self._cycle()) + 1
            if done > self._normal_done:
                self._normal_done = done
                self._measure()

    def _measure(self) -> None:
        self.measurements += 1
        temperature, humidity, pressure = self.environment(self.env_time())
        if self.noise:
            temperature += self._rng.gauss(0.0, 0.01)
            humidity += self._rng.gauss(0.0, 0.05)
            pressure += self._rng.gauss(0.0, 1.5)
        ctrl = self.regs[REG_CTRL_MEAS]
        cal = self.calibration
        adc_t = _invert(lambda x: compensate_temperature(x, cal)[0], temperature, 0, 0xFFFFF)
        t_fine = compensate_temperature(adc_t, cal)[1]
        adc_p = _invert(lambda x: compensate_pressure(x, t_fine, cal) or 0.0, pressure,
                        0, 0xFFFFF)
        adc_h = _invert(lambda x: compensate_humidity(x, t_fine, cal), humidity, 0, 0xFFFF)
        # A measured value never looks like the skip marker.
        adc_t += adc_t == SKIPPED_TP
        adc_p += adc_p == SKIPPED_TP
        adc_h += adc_h == SKIPPED_H
        if not ctrl >> 5:
            adc_t = SKIPPED_TP
        if not (ctrl >> 2) & 7:
            adc_p = SKIPPED_TP
        if not self._osrs_h:
            adc_h = SKIPPED_H
        self.regs[REG_DATA:REG_DATA + 8] = bytes((
            adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
            adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4,
            adc_h >> 8, adc_h & 0xFF,
        ))

    def read(self, length: int) -> bytes:
        self._update()
        now = self.clock()
        out = bytearray()
        for _ in range(length):
            reg = self.pointer
            out.append(self._status(now) if reg == REG_STATUS else self.regs[reg])
            self.pointer = (reg + 1) & 0xFF
        return bytes(out)


def emulate(cfg: Any, ctx: BuildContext) -> None:
    """For ``bus = "emulated"``: a BME280 at the sensor's address, on the agent's clock."""
    attach(cfg, ctx, DEFAULT_ADDRESS, lambda mono, wall: Bme280Emulator(clock=mono, env_time=wall))
