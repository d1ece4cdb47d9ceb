"""Units as a technician reads them on a screen; the feed and ``--json`` keep SI.

Pressure in hectopascals (the weather report's unit, not 101325 Pa), and no unit at all for a
ratio such as a power factor (SI writes it "1", which reads as a second number: "0.98 1").
"""

from __future__ import annotations

from typing import Any, Final

# unit -> (the unit shown, factor from the SI value to the shown one)
SHOWN: Final[dict[str, tuple[str, float]]] = {
    "Pa": ("hPa", 0.01),
    "1": ("", 1.0),
}


def for_display(value: Any, unit: Any) -> tuple[Any, str]:
    """``value`` and ``unit`` as shown on a screen."""
    text = "" if unit is None else str(unit)
    shown, factor = SHOWN.get(text, (text, 1.0))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and factor != 1.0:
        value = value * factor
    return value, shown
