"""How numbers go on the wire: the rounding rule of the feed and the units of derived values.

A float is sent with ``SIGNIFICANT_DIGITS`` significant digits: more than any supported sensor
resolves (BME280 converts with at most 20 bits, about 6 digits) and what a 32-bit float holds,
so nothing a sensor measured is lost, while the noise of float arithmetic
(``230.56666666666666``) is. A counter (energy, pulses) may grow past 10**7 and must stay exact
to its last unit, so in ``COUNTER_UNITS`` a value is never rounded coarser than
``COUNTER_DECIMALS`` places. docs/mqtt.md ("Numbers") states the same rule for consumers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

SIGNIFICANT_DIGITS: Final = 7
COUNTER_UNITS: Final = frozenset({"Wh", "varh", "VAh", "count"})
COUNTER_DECIMALS: Final = 3

# The unit of each derived value a window may carry (agent.pipeline.derived; a test keeps the
# two in step).
DERIVED_UNITS: Final[Mapping[str, str]] = {
    "vehicles": "count", "flow_veh_h": "veh/h", "speed_in_mean": "m/s",
    "speed_out_mean": "m/s", "speed_mean": "m/s", "occupancy": "1",
    "power_mean_w": "W", "energy_wh": "Wh",
}


def rounded(value: float, unit: str = "") -> float | None:
    """``value`` to the feed's precision for ``unit``; None for NaN and infinities (JSON has
    neither)."""
    if not math.isfinite(value):
        return None
    if value == 0.0:
        return 0.0
    decimals = SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value)))
    if unit in COUNTER_UNITS:
        decimals = max(decimals, COUNTER_DECIMALS)
    out = round(value, decimals)
    # Rounding at the edge of the float range can overflow (round(1.7e308, -302) is inf).
    return out if math.isfinite(out) else value


def rounded_any(value: Any, unit: str = "") -> Any:
    """``rounded`` for a float; anything else (text, an integer, None) unchanged."""
    return rounded(value, unit) if isinstance(value, float) else value


def round_last_values(sensors: Any) -> Any:
    """Sensor snapshots (health, the ``sensors.read`` reply) with each last value rounded for
    its unit, in place; returned for convenience. Anything not shaped so is left alone."""
    for sensor in sensors if isinstance(sensors, list) else ():
        values = sensor.get("last_values") if isinstance(sensor, dict) else None
        for v in values.values() if isinstance(values, dict) else ():
            if isinstance(v, dict) and isinstance(v.get("value"), float):
                v["value"] = rounded(v["value"], str(v.get("unit", "")))
    return sensors
