"""TI ADS1115: 16-bit ADC, single-shot conversions, volts or a linear engineering unit.

Layers: pure config encoding and decoding -> ``Ads1115IO`` (blocking transfers on any
smbus2-compatible bus) -> ``Ads1115Sensor`` (async, on the bus worker) -> ``build``.

Registers, 16-bit big-endian, selected by a 2-bit pointer (datasheet section 9.6)::

    0 conversion  signed, LSB = full scale / 2^15
    1 config      [OS:15][MUX:14..12][PGA:11..9][MODE:8][DR:7..5][COMP:4..2][QUE:1..0]
                  reset 0x8583; OS: write 1 = start a single shot, reads 0 while converting
    2 lo_thresh, 3 hi_thresh (comparator; unused here: QUE = 11 disables it)

Options::

    data_rate = 128                       # samples/s: 8 16 32 64 128 250 475 860
    channels = [                          # default: ain0..ain3 single-ended at 4.096 V
      {mux = "ain0", pga = 4.096, quantity = "ct_current", unit = "A", scale = 30.0},
      {mux = "ain2-ain3"},                # differential; quantity defaults to "ain2_ain3"
    ]

A channel's value is ``volts * scale + offset`` in ``unit`` (V unless given). A conversion at
either end of the code range means the input is beyond the PGA's full scale: it is flagged
``overflow``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.clock import Clock
from agent.quality import OVERFLOW
from agent.readings import UNITS, Reading
from drivers.base import BuildContext, DeviceNotReady, ProtocolError
from drivers.i2c.bus import AsyncI2CBus
from drivers.i2c.regio import RegisterIO, hex16, to_s16
from drivers.i2c.sensor import I2CSensor, bus_for, parse_options

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = 0x48
REG_CONVERSION, REG_CONFIG, REG_LO_THRESH, REG_HI_THRESH = range(4)
CONFIG_POR = 0x8583
LO_THRESH_POR = 0x8000
HI_THRESH_POR = 0x7FFF
OS_BIT = 0x8000
MODE_SINGLE = 0x0100
COMP_DISABLED = 0x0003

MUX_CODE = {"ain0-ain1": 0, "ain0-ain3": 1, "ain1-ain3": 2, "ain2-ain3": 3,
            "ain0": 4, "ain1": 5, "ain2": 6, "ain3": 7}
PGA_CODE = {6.144: 0, 4.096: 1, 2.048: 2, 1.024: 3, 0.512: 4, 0.256: 5}
PGA_VOLTS = (6.144, 4.096, 2.048, 1.024, 0.512, 0.256, 0.256, 0.256)  # code -> full scale
DR_CODE = {8: 0, 16: 1, 32: 2, 64: 3, 128: 4, 250: 5, 475: 6, 860: 7}
DR_SPS = (8, 16, 32, 64, 128, 250, 475, 860)
CONVERSION_MARGIN_S = 0.0002  # on top of 1.1 / DR: the oscillator may run 10 % slow
CONVERSION_POLLS = 12  # with polls 0.1/DR apart, gives up after 2.2/DR + 0.2 ms
QUANTITY_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"


# --- pure encoding and decoding ----------------------------------------------------------------
def config_word(mux: int, pga: int, data_rate: int) -> int:
    """Config that starts one single-shot conversion, comparator off."""
    return (OS_BIT | (mux << 12) | (pga << 9) | MODE_SINGLE | (data_rate << 5)
            | COMP_DISABLED)


def code_to_volts(code: int, pga: int) -> float:
    """Volts from a conversion register value (raw 16-bit) at PGA setting ``pga``."""
    return to_s16(code) * PGA_VOLTS[pga] / 32768.0


def saturated(code: int) -> bool:
    return code in (0x7FFF, 0x8000)


def conversion_wait_s(data_rate_sps: int) -> float:
    return 1.1 / data_rate_sps + CONVERSION_MARGIN_S


# --- options -----------------------------------------------------------------------------------
class ChannelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mux: str
    pga: float = 4.096
    quantity: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    unit: str = "V"
    scale: float = 1.0
    offset: float = 0.0

    @field_validator("mux", mode="before")
    @classmethod
    def _mux(cls, v: Any) -> Any:
        if isinstance(v, str):
            key = re.sub(r"\s+", "", v.lower()).replace("_", "-")
            if key not in MUX_CODE:
                raise ValueError(f"{v!r} is not an input: use one of {', '.join(MUX_CODE)}")
            return key
        return v

    @field_validator("pga")
    @classmethod
    def _pga(cls, v: float) -> float:
        if v not in PGA_CODE:
            raise ValueError(f"{v:g} V is not a full-scale range the PGA has "
                             f"({', '.join(f'{k:g}' for k in PGA_CODE)})")
        return v

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        if v not in UNITS:
            raise ValueError(f"{v!r} is not a canonical unit ({', '.join(sorted(UNITS))})")
        return v

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @property
    def name(self) -> str:
        return self.quantity or self.mux.replace("-", "_")

    @property
    def mux_code(self) -> int:
        return MUX_CODE[self.mux]

    @property
    def pga_code(self) -> int:
        return PGA_CODE[self.pga]


def _default_channels() -> list[ChannelOptions]:
    return [ChannelOptions(mux=f"ain{i}") for i in range(4)]


class Ads1115Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_rate: Literal[8, 16, 32, 64, 128, 250, 475, 860] = 128
    channels: list[ChannelOptions] = Field(default_factory=_default_channels, min_length=1,
                                           max_length=8)

    @model_validator(mode="after")
    def _unique(self) -> Ads1115Options:
        seen: set[str] = set()
        for ch in self.channels:
            if ch.name in seen:
                raise ValueError(f"two channels are named {ch.name!r}: give each a quantity")
            seen.add(ch.name)
        return self


# --- I/O shell ---------------------------------------------------------------------------------
class Ads1115IO(RegisterIO):
    def read_config(self) -> int:
        return self.read_u16_be(REG_CONFIG)

    def start(self, config: int) -> None:
        self.write_u16_be(REG_CONFIG, config)

    def conversion_done(self, written: int) -> bool:
        """OS reads 1 once the conversion is done; the other bits must read back as written,
        else this is not an ADS1115 (or it was reset) and its result would be wrong."""
        config = self.read_u16_be(REG_CONFIG)
        if config & ~OS_BIT != written & ~OS_BIT:
            raise ProtocolError(f"config reads back {hex16(config)} after writing "
                                f"{hex16(written)}: not an ADS1115, or it was reset",
                                where=self.where(REG_CONFIG))
        return bool(config & OS_BIT)

    def read_conversion(self) -> int:
        return self.read_u16_be(REG_CONVERSION)


# --- sensor ------------------------------------------------------------------------------------
class Ads1115Sensor(I2CSensor):
    def __init__(self, name: str, clock: Clock, period_s: float, *, bus: AsyncI2CBus,
                 address: int, timeout_s: float, options: Ads1115Options) -> None:
        super().__init__(name, clock, period_s, bus=bus, address=address, timeout_s=timeout_s)
        self.options = options
        self.dr_code = DR_CODE[options.data_rate]
        self._io = Ads1115IO(bus.handle, address, bus.label)
        self._open = False

    async def open(self) -> None:
        self._open = False
        await self.bus.open(self.timeout_s)
        # One read proves the chip answers; each conversion writes the whole config anyway.
        await self.io(self._io.read_config)
        self._open = True

    async def convert(self, ch: ChannelOptions) -> int:
        """One single-shot conversion of ``ch``: the raw conversion register."""
        rate = self.options.data_rate
        config = config_word(ch.mux_code, ch.pga_code, self.dr_code)
        await self.io(self._io.start, config)
        await self.poll(partial(self._io.conversion_done, config),
                        first_wait_s=conversion_wait_s(rate),
                        interval_s=max(0.1 / rate, CONVERSION_MARGIN_S),
                        attempts=CONVERSION_POLLS, what=f"conversion of {ch.mux} (OS bit)")
        return await self.io(self._io.read_conversion)

    async def sample(self) -> Sequence[Reading]:
        if not self._open:
            raise DeviceNotReady("not open", where=self.where)
        out = []
        for ch in self.options.channels:
            code = await self.convert(ch)
            out.append(self.channel_reading(ch, code))
        return out

    def channel_reading(self, ch: ChannelOptions, code: int) -> Reading:
        reasons: tuple[str, ...] = ()
        if saturated(code):
            reasons = (OVERFLOW,)
            self.count("overflow")
        value = code_to_volts(code, ch.pga_code) * ch.scale + ch.offset
        return self.reading(ch.name, value, ch.unit, reasons)


def build(cfg: Any, ctx: BuildContext) -> Ads1115Sensor:
    """``cfg`` is a SensorConfig with ``driver = "ads1115"``."""
    options = parse_options(Ads1115Options, cfg.options, sensor=cfg.name)
    bus, address = bus_for(cfg, ctx, DEFAULT_ADDRESS)
    return Ads1115Sensor(cfg.name, ctx.clock, cfg.period_s, bus=bus, address=address,
                         timeout_s=cfg.timeout_s, options=options)
