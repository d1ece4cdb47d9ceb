"""Per-channel cleaning options, as they appear under ``[sensors.clean.<quantity>]``, and the
per-quantity defaults they override.

The defaults are a table keyed by quantity (canonical units, see ``agent.readings.UNITS``).
``resolve`` merges a sensor's overrides with the table into a ``ChannelPolicy``: one frozen
object per channel, read on every reading's path, so nothing is looked up twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Check = Literal["range", "rate", "hampel", "stuck", "stale"]
PositiveFloat = Annotated[float, Field(gt=0, le=1e12, allow_inf_nan=False)]
Physical = Annotated[float, Field(ge=-1e15, le=1e15, allow_inf_nan=False)]
"""Any value in canonical units: energy counters in Wh reach 1e9, nothing real reaches 1e15."""


class CleanOptions(BaseModel):
    """Overrides of the per-quantity defaults. ``None`` keeps the default for the quantity."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    min: Physical | None = None
    """Lowest physical value, canonical units; below it a reading is bad (`out_of_range`)."""
    max: Physical | None = None
    """Highest physical value, canonical units; above it a reading is bad (`out_of_range`)."""
    max_rate: PositiveFloat | None = None
    """Fastest believable change, canonical units per second; faster is suspect (`rate`)."""
    hampel_window: Annotated[int, Field(ge=3, le=101)] | None = None
    """Readings in the spike detector's sliding median window."""
    hampel_k: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] | None = None
    """Spike threshold in robust standard deviations (scaled MAD) from the window median."""
    stuck_count: Annotated[int, Field(ge=2, le=1_000_000)] | None = None
    """Identical readings in a row after which the channel is suspect (`stuck`)."""
    stale_factor: Annotated[float, Field(gt=1, le=10_000, allow_inf_nan=False)] | None = None
    """A channel is stale after this many sensor periods without a reading."""
    noise: PositiveFloat | None = None
    """Typical sample noise (1 sigma): the smallest spread the spike detector assumes, so a
    quiet, quantised signal does not turn every last-digit change into a spike."""
    fuse_sigma: PositiveFloat | None = None
    """Absolute accuracy of one sensor (1 sigma): the smallest spread fusion gives a channel,
    so averaging many readings cannot make a biased sensor look precise."""
    skip: list[Check] = Field(default_factory=list, max_length=16)
    """Checks to switch off for this channel."""
    enabled: bool = True
    """`false` switches every value check off; duplicates and NaN/inf are still caught."""

    @model_validator(mode="after")
    def _range_order(self) -> CleanOptions:
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


@dataclass(frozen=True, slots=True)
class QuantityDefaults:
    """What is normal for one quantity. ``None`` switches a check off."""

    unit: str
    min: float | None = None
    max: float | None = None
    max_rate: float | None = None  # canonical units per second
    hampel_window: int | None = None
    hampel_k: float = 5.0
    noise: float = 0.0
    stuck_count: int | None = None  # only where sensor noise makes exact repeats unlikely
    stale_factor: float | None = 3.0  # None: event channels, silence is normal
    fuse_sigma: float = 0.0


_ENV: Final = 60  # exact repeats of a noisy environmental reading before it counts as stuck
# A median/MAD over few samples is itself noisy: with 7 samples and k = 3.5, about 7 % of pure
# Gaussian noise reads as spikes. 15 samples, k = 5 and a noise floor at the sensor's noise
# (BME280: ~0.01 degC, ~0.02 %RH, ~3 Pa at x1 oversampling) keep false spikes out.
_HW: Final = 15
_HK: Final = 5.0
_PM: Final = QuantityDefaults("ug/m3", 0.0, 2000.0, None, _HW, 6.0, 1.0, fuse_sigma=10.0)
_PARTICLES: Final = QuantityDefaults("count", 0.0, 65535.0)

# Ranges: BME280 operating range (-40..85 degC, 0..100 %RH, 300..1100 hPa); INA219 32 V bus and
# +-320 mV shunt; PZEM-004T 80..260 V, 0..100 A, 45..65 Hz (with margin); PMS5003 counts are u16.
# Stuck detection is off for quantised or resting signals (mains frequency at 0.1 Hz, power factor,
# supply voltages at 4 mV steps, zero currents, counters, alarms, vehicle events).
DEFAULTS: Final[dict[str, QuantityDefaults]] = {
    "temperature": QuantityDefaults("degC", -40.0, 85.0, 3.0, _HW, _HK, 0.02, _ENV, fuse_sigma=0.5),
    "humidity": QuantityDefaults("%RH", 0.0, 100.0, 5.0, _HW, _HK, 0.1, _ENV, fuse_sigma=3.0),
    "pressure": QuantityDefaults("Pa", 30000.0, 110000.0, 200.0, _HW, _HK, 4.0, _ENV,
                                 fuse_sigma=100.0),
    "bus_voltage": QuantityDefaults("V", 0.0, 32.0, noise=0.004, fuse_sigma=0.02),
    "shunt_voltage": QuantityDefaults("V", -0.32, 0.32, noise=1e-5, fuse_sigma=1e-4),
    "current": QuantityDefaults("A", -100.0, 100.0, noise=0.001, fuse_sigma=0.01),
    "power": QuantityDefaults("W", -26000.0, 26000.0, noise=0.1, fuse_sigma=1.0),
    "voltage": QuantityDefaults("V", 0.0, 300.0, noise=0.1, fuse_sigma=0.5),
    "active_power": QuantityDefaults("W", 0.0, 26000.0, noise=0.1, fuse_sigma=1.0),
    "energy": QuantityDefaults("Wh", 0.0, 1e7),
    "frequency": QuantityDefaults("Hz", 40.0, 70.0, 2.0, noise=0.1, fuse_sigma=0.1),
    "power_factor": QuantityDefaults("1", 0.0, 1.0),
    # Modbus energy meters (Eastron SDM120/SDM630): signed where power can flow both ways.
    "apparent_power": QuantityDefaults("VA", 0.0, 1e6, noise=0.1),
    "reactive_power": QuantityDefaults("var", -1e6, 1e6, noise=0.1),
    "reactive_energy": QuantityDefaults("varh", 0.0, 1e10),
    "phase_angle": QuantityDefaults("deg", -180.0, 360.0),
    "alarm": QuantityDefaults("1", 0.0, 1.0),
    "speed_in": QuantityDefaults("m/s", 0.0, 90.0, stale_factor=None),
    "speed_out": QuantityDefaults("m/s", 0.0, 90.0, stale_factor=None),
    "occupancy": QuantityDefaults("1", 0.0, 1.0),
    "vehicle_count": QuantityDefaults("count", 0.0, 10000.0),
    "pulses": QuantityDefaults("count", 0.0, 1e9),
    "pm1_0": _PM,
    "pm2_5": _PM,
    "pm10": _PM,
    "particles_0_3": _PARTICLES,
    "particles_0_5": _PARTICLES,
    "particles_1_0": _PARTICLES,
    "particles_2_5": _PARTICLES,
    "particles_5_0": _PARTICLES,
    "particles_10": _PARTICLES,
}

# A quantity not in the table (e.g. an ADC input in a configured engineering unit) gets only the
# checks that need no knowledge of it: finite values, duplicates and staleness.
GENERIC: Final = QuantityDefaults(unit="")


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    """The resolved checks of one channel; ``None`` means the check is off."""

    unit: str  # expected canonical unit, "" when any unit is accepted
    min: float
    max: float
    max_rate: float | None
    hampel_window: int | None
    hampel_k: float
    noise: float
    stuck_count: int | None
    stale_ns: int | None
    forget_ns: int | None  # a gap longer than this makes the spike and rate history void
    fuse_sigma: float
    enabled: bool


def defaults_for(quantity: str) -> QuantityDefaults:
    """The defaults of ``quantity``, or of the longest known quantity it extends with ``_...``
    (a meter's `voltage_l1`, `energy_export`, `power_factor_l2` are checked as voltage,
    energy, power factor)."""
    d = DEFAULTS.get(quantity)
    if d is not None:
        return d
    parts = quantity.split("_")
    for n in range(len(parts) - 1, 0, -1):
        d = DEFAULTS.get("_".join(parts[:n]))
        if d is not None:
            return d
    return GENERIC


def resolve(quantity: str, period_s: float | None, opts: CleanOptions | None) -> ChannelPolicy:
    """Merge a channel's overrides with the defaults of its quantity."""
    d = defaults_for(quantity)
    o = opts if opts is not None else CleanOptions()
    skip = o.skip

    def pick(override: float | None, default: float | None) -> float | None:
        return override if override is not None else default

    lo = pick(o.min, d.min)
    hi = pick(o.max, d.max)
    window = o.hampel_window if o.hampel_window is not None else d.hampel_window
    stuck = o.stuck_count if o.stuck_count is not None else d.stuck_count
    factor = pick(o.stale_factor, d.stale_factor)
    stale_ns = None
    forget_ns = None
    if factor is not None and period_s is not None and "stale" not in skip:
        # Rounded: 3 x 0.3 s is 0.8999999999999999e9 in floating point.
        stale_ns = round(factor * period_s * 1e9)
        # The spike window's median lags half a window behind the signal anyway; a gap up to
        # that long at most doubles the lag, so the old reference still holds.
        forget_ns = max(stale_ns, round((window or 0) * period_s * 0.5e9))
    ranged = "range" not in skip
    return ChannelPolicy(
        unit=d.unit,
        min=lo if lo is not None and ranged else -math.inf,
        max=hi if hi is not None and ranged else math.inf,
        max_rate=None if "rate" in skip else pick(o.max_rate, d.max_rate),
        hampel_window=None if "hampel" in skip else window,
        hampel_k=o.hampel_k if o.hampel_k is not None else d.hampel_k,
        noise=o.noise if o.noise is not None else d.noise,
        stuck_count=None if "stuck" in skip else stuck,
        stale_ns=stale_ns,
        forget_ns=forget_ns,
        fuse_sigma=o.fuse_sigma if o.fuse_sigma is not None else d.fuse_sigma,
        enabled=o.enabled,
    )
