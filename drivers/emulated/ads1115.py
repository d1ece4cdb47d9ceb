"""An ADS1115 at register level: power-on values, single-shot conversions with the OS bit,
continuous mode, PGA clipping, and four analog inputs with a cabinet's signals.

A conversion takes ``oscillator / DR`` seconds on ``clock`` (monotonic seconds) and samples
``inputs(env_time())`` -> volts on AIN0..AIN3 at its end. The comparator is not emulated (its
registers hold their values). Hooks: ``set_input(pin, volts)`` overrides one input (``None``
gives it back to the model), plus the shared unplug / replug / NACK storm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from drivers.base import BuildContext
from drivers.emulated.i2c_bus import TimeFn, WordRegisterChip
from drivers.emulated.i2c_setup import attach
from drivers.i2c.ads1115 import (
    CONFIG_POR,
    DEFAULT_ADDRESS,
    DR_SPS,
    HI_THRESH_POR,
    LO_THRESH_POR,
    MODE_SINGLE,
    OS_BIT,
    PGA_VOLTS,
    REG_CONFIG,
    REG_CONVERSION,
    REG_HI_THRESH,
    REG_LO_THRESH,
)

Inputs = Callable[[float], tuple[float, float, float, float]]  # t -> AIN0..AIN3 volts
DAY_S = 86_400.0
CT_AMPS_PER_VOLT = 30.0  # a 30 A : 1 V clamp with an RMS converter output
MUX_PINS = ((0, 1), (0, 3), (1, 3), (2, 3), (0, None), (1, None), (2, None), (3, None))


def cabinet_load_amps(t: float) -> float:
    """A street cabinet's AC load: standby, daytime equipment, lighting after dark and a
    cooling fan cycling eight minutes in twenty."""
    hour = (t % DAY_S) / 3600.0
    day = max(0.0, math.sin(math.pi * (hour - 7.0) / 12.0))
    lights = 2.0 if hour >= 18.5 or hour < 6.0 else 0.0
    fan = 3.5 if (t % 1200.0) < 480.0 else 0.0
    return 1.5 + 5.0 * day + lights + fan + 0.05 * math.sin(2 * math.pi * t / 7.0)


def cabinet_inputs(t: float) -> tuple[float, float, float, float]:
    """AIN0: CT clamp converter (A / 30 V); AIN1: a loop detector's analog output, high while a
    vehicle is over the loop; AIN2: supply monitor (half of 3.3 V); AIN3: ground reference."""
    occupied = (t % 23.0) < 0.7
    return (cabinet_load_amps(t) / CT_AMPS_PER_VOLT, 2.1 if occupied else 0.4, 1.65, 0.0)


class Ads1115Emulator(WordRegisterChip):
    kind = "ads1115"
    pointer_mask = 0x03

    def __init__(self, *, clock: TimeFn = time.monotonic, env_time: TimeFn = time.time,
                 inputs: Inputs = cabinet_inputs, oscillator: float = 1.0) -> None:
        super().__init__(clock)
        self.env_time = env_time
        self.inputs = inputs
        self.oscillator = oscillator  # > 1 runs slow, like a cold part
        self.overrides: dict[int, float] = {}
        self.conversions = 0
        self.power_on_reset()

    def set_input(self, pin: int, volts: float | None) -> None:
        with self.lock:
            if volts is None:
                self.overrides.pop(pin, None)
            else:
                self.overrides[pin] = volts

    # --- chip behaviour --------------------------------------------------------------------
    def power_on_reset(self) -> None:
        self.config = CONFIG_POR & ~OS_BIT
        self.lo_thresh = LO_THRESH_POR
        self.hi_thresh = HI_THRESH_POR
        self.conversion = 0
        self._until: float | None = None  # end of the single shot in progress
        self._since: float | None = None  # start of continuous conversions
        self._done = 0

    def _period(self) -> float:
        return self.oscillator / DR_SPS[(self.config >> 5) & 0x07]

    def _update(self) -> None:
        now = self.clock()
        if self._until is not None and now >= self._until:
            self._until = None
            self._convert()
        if self._since is not None:
            due = math.floor((now - self._since) / self._period())
            if due > self._done:
                self._done = due
                self._convert()

    def _convert(self) -> None:
        self.conversions += 1
        volts = list(self.inputs(self.env_time()))
        for pin, v in self.overrides.items():
            volts[pin] = v
        positive, negative = MUX_PINS[(self.config >> 12) & 0x07]
        diff = volts[positive] - (0.0 if negative is None else volts[negative])
        lsb = PGA_VOLTS[(self.config >> 9) & 0x07] / 32768.0
        code = max(-32768, min(32767, round(diff / lsb)))
        self.conversion = code & 0xFFFF

    def read_register(self, pointer: int) -> int:
        self._update()
        if pointer == REG_CONVERSION:
            return self.conversion
        if pointer == REG_CONFIG:
            busy = self._until is not None or self._since is not None
            return self.config | (0 if busy else OS_BIT)
        if pointer == REG_LO_THRESH:
            return self.lo_thresh
        return self.hi_thresh

    def write_register(self, pointer: int, value: int) -> None:
        self._update()
        if pointer == REG_CONFIG:
            self.config = value & ~OS_BIT
            if not value & MODE_SINGLE:
                self._until = None
                self._since = self.clock()
                self._done = 0
            else:
                self._since = None
                if value & OS_BIT and self._until is None:
                    self._until = self.clock() + self._period()
        elif pointer == REG_LO_THRESH:
            self.lo_thresh = value
        elif pointer == REG_HI_THRESH:
            self.hi_thresh = value


def emulate(cfg: Any, ctx: BuildContext) -> None:
    """For ``bus = "emulated"``: an ADS1115 at the sensor's address, on the agent's clock."""
    attach(cfg, ctx, DEFAULT_ADDRESS, lambda mono, wall: Ads1115Emulator(clock=mono, env_time=wall))
