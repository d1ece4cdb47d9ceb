"""An INA219 at register level: power-on values, reset bit, calibration maths, conversion timing
with CNVR/OVF, and a solar charge day on the bus it measures.

Conversions run on ``clock`` (monotonic seconds) at the datasheet's times for the configured
ADC settings; each completed conversion samples ``source(env_time())`` -> (bus volts, current
amps) and computes the current and power registers with the calibration in force at that
moment, as the chip does. With calibration 0 (after power-on) current and power read 0.

Fault hooks beyond the shared ones: ``brown_out()`` (power-on reset: calibration cleared,
config back to 0x399F), ``force_overflow(on)`` (OVF set on every conversion) and ``pin(...)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from drivers.base import BuildContext
from drivers.emulated.i2c_bus import TimeFn, WordRegisterChip
from drivers.emulated.i2c_setup import attach
from drivers.i2c.ina219 import (
    BUS_CNVR,
    BUS_OVF,
    CONFIG_POR,
    CONFIG_RESET,
    DEFAULT_ADDRESS,
    REG_BUS,
    REG_CAL,
    REG_CONFIG,
    REG_CURRENT,
    REG_POWER,
    REG_SHUNT,
    Ina219Options,
    config_conversion_s,
)
from drivers.i2c.sensor import parse_options

Source = Callable[[float], tuple[float, float]]  # t -> (bus volts, current amps)
DAY_S = 86_400.0


def solar_charge(t: float) -> tuple[float, float]:
    """A 12 V battery charged by a panel: current follows daylight (06:00..18:00 UTC of ``t``)
    with passing clouds, minus a small cabinet load; the voltage rises with the charge."""
    hour = (t % DAY_S) / 3600.0
    sun = max(0.0, math.sin(math.pi * (hour - 6.0) / 12.0))
    clouds = 1.0 - 0.35 * max(0.0, math.sin(2 * math.pi * t / 2700.0)) ** 4
    charge = 2.4 * sun ** 1.3 * clouds
    load = 0.12 + (0.05 if math.sin(2 * math.pi * t / 600.0) > 0.6 else 0.0)
    bus = 12.25 + 1.0 * sun ** 0.6 + 0.35 * charge / 2.4
    return bus, charge - load


class Ina219Emulator(WordRegisterChip):
    kind = "ina219"
    pointer_mask = 0x07

    def __init__(self, *, shunt_ohms: float = 0.1, clock: TimeFn = time.monotonic,
                 env_time: TimeFn = time.time, source: Source = solar_charge) -> None:
        super().__init__(clock)
        self.shunt_ohms = shunt_ohms
        self.env_time = env_time
        self.source = source
        self.resets = 0
        self.conversions = 0
        self.overflow_forced = False
        self.config = CONFIG_POR
        self.cal = 0
        self.power_on_reset()

    # --- hooks -----------------------------------------------------------------------------
    def pin(self, bus_v: float, current_a: float) -> None:
        """Hold the measured bus voltage and current at fixed values."""
        with self.lock:
            self.source = lambda t: (bus_v, current_a)

    def brown_out(self) -> None:
        """A supply dip resets the chip: power-on config, calibration cleared."""
        with self.lock:
            self.resets += 1
            self.power_on_reset()

    def force_overflow(self, on: bool = True) -> None:
        with self.lock:
            self.overflow_forced = on

    # --- chip behaviour --------------------------------------------------------------------
    def power_on_reset(self) -> None:
        self.config = CONFIG_POR
        self.cal = 0
        self.shunt = 0
        self.bus = 0
        self.current = 0
        self.power = 0
        self.cnvr = False
        self.ovf = False
        self._restart()

    def _restart(self) -> None:
        self._since = self.clock()
        self._done = 0

    def _mode(self) -> int:
        return self.config & 0x07

    def _update(self) -> None:
        mode = self._mode()
        if mode in (0b000, 0b100):  # power-down, ADC off
            return
        due = math.floor((self.clock() - self._since) / config_conversion_s(self.config))
        if mode < 0b100:  # triggered: one conversion per config write
            due = min(due, 1)
        if due > self._done:
            self._done = due
            self._convert()

    def _convert(self) -> None:
        self.conversions += 1
        bus_v, current_a = self.source(self.env_time())
        full_scale = 4000 << ((self.config >> 11) & 0x03)  # PG range in 10 uV counts
        shunt = round(current_a * self.shunt_ohms / 10e-6)
        self.shunt = max(-full_scale, min(full_scale, shunt)) & 0xFFFF
        bus_max = 8191 if self.config & 0x2000 else 4000
        self.bus = max(0, min(bus_max, round(bus_v / 0.004)))
        signed_shunt = max(-full_scale, min(full_scale, shunt))
        cur = math.trunc(signed_shunt * self.cal / 4096)
        pwr = math.trunc(abs(cur) * self.bus / 5000)
        self.ovf = self.overflow_forced or not -32768 <= cur <= 32767 or pwr > 0xFFFF
        self.current = max(-32768, min(32767, cur)) & 0xFFFF
        self.power = min(pwr, 0xFFFF)
        self.cnvr = True

    def read_register(self, pointer: int) -> int:
        self._update()
        if pointer == REG_CONFIG:
            return self.config
        if pointer == REG_SHUNT:
            return self.shunt
        if pointer == REG_BUS:
            return (self.bus << 3) | (BUS_CNVR if self.cnvr else 0) | (BUS_OVF if self.ovf else 0)
        if pointer == REG_POWER:
            self.cnvr = False
            return self.power
        if pointer == REG_CURRENT:
            return self.current
        if pointer == REG_CAL:
            return self.cal
        return 0

    def write_register(self, pointer: int, value: int) -> None:
        self._update()
        if pointer == REG_CONFIG:
            if value & CONFIG_RESET:
                self.power_on_reset()
                return
            self.config = value & 0x3FFF
            self.cnvr = False
            self._restart()
        elif pointer == REG_CAL:
            self.cal = value & 0xFFFE


def emulate(cfg: Any, ctx: BuildContext) -> None:
    """For ``bus = "emulated"``: an INA219 with the configured shunt at the sensor's address."""
    options = parse_options(Ina219Options, cfg.options, sensor=cfg.name)
    attach(cfg, ctx, DEFAULT_ADDRESS, lambda mono, wall: Ina219Emulator(
        shunt_ohms=options.shunt_ohms, clock=mono, env_time=wall))
