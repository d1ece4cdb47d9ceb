"""Units a register map may be written in, and the canonical unit and factor each maps to.

Canonical units are those of ``agent.readings.UNITS``; a profile names the unit the device
reports in (a meter's ``kWh``) and the driver multiplies by the factor here (``Wh``, 1000).
"""

from __future__ import annotations

from typing import Final

# unit as written in a profile -> (canonical unit, factor)
UNIT_MAP: Final[dict[str, tuple[str, float]]] = {
    "1": ("1", 1.0), "": ("1", 1.0), "%": ("1", 0.01),
    "V": ("V", 1.0), "mV": ("V", 1e-3), "kV": ("V", 1e3),
    "A": ("A", 1.0), "mA": ("A", 1e-3), "kA": ("A", 1e3),
    "W": ("W", 1.0), "kW": ("W", 1e3), "MW": ("W", 1e6),
    "Wh": ("Wh", 1.0), "kWh": ("Wh", 1e3), "MWh": ("Wh", 1e6),
    "var": ("var", 1.0), "VAr": ("var", 1.0), "kvar": ("var", 1e3), "kVAr": ("var", 1e3),
    "VA": ("VA", 1.0), "kVA": ("VA", 1e3),
    "varh": ("varh", 1.0), "VArh": ("varh", 1.0), "kvarh": ("varh", 1e3),
    "kVArh": ("varh", 1e3),
    "VAh": ("VAh", 1.0), "kVAh": ("VAh", 1e3),
    "Hz": ("Hz", 1.0),
    "deg": ("deg", 1.0),
    "degC": ("degC", 1.0),
    "%RH": ("%RH", 1.0),
    "Pa": ("Pa", 1.0), "hPa": ("Pa", 100.0), "kPa": ("Pa", 1e3), "bar": ("Pa", 1e5),
    "m/s": ("m/s", 1.0), "km/h": ("m/s", 1 / 3.6),
    "ug/m3": ("ug/m3", 1.0),
    "s": ("s", 1.0), "ms": ("s", 1e-3), "min": ("s", 60.0), "h": ("s", 3600.0),
    "count": ("count", 1.0),
}


def canonical(unit: str) -> tuple[str, float]:
    """(canonical unit, factor) for ``unit``; KeyError if it is not known."""
    return UNIT_MAP[unit]
