"""The table of known drivers: name -> module, bus kind and valid I2C addresses.

Modules are imported lazily, so a gateway only loads the drivers its config names and a broken
optional driver cannot stop the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from drivers.base import BuildContext, Sensor

Kind = Literal["i2c", "serial", "bridge", "virtual"]


@dataclass(frozen=True)
class DriverInfo:
    module: str
    kind: Kind
    description: str
    addresses: tuple[int, ...] = ()  # I2C addresses the chip can be strapped to


def _range(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


DRIVERS: dict[str, DriverInfo] = {
    "bme280": DriverInfo("drivers.i2c.bme280", "i2c", "Bosch BME280 temperature/humidity/pressure",
                         (0x76, 0x77)),
    "ina219": DriverInfo("drivers.i2c.ina219", "i2c", "TI INA219 DC bus voltage/current/power",
                         _range(0x40, 0x4F)),
    "ads1115": DriverInfo("drivers.i2c.ads1115", "i2c", "TI ADS1115 16-bit ADC",
                          _range(0x48, 0x4B)),
    "ops243": DriverInfo("drivers.serial.ops243", "serial", "OmniPreSense OPS243-A Doppler radar"),
    "pzem004t": DriverInfo("drivers.serial.pzem004t", "serial", "PZEM-004T v3 AC energy meter"),
    "pms5003": DriverInfo("drivers.serial.pms5003", "serial",
                          "Plantower PMS5003 particulate sensor"),
    "bridge": DriverInfo("firmware_bridge.sensor", "bridge", "Sensor microcontroller over UART"),
    "synthetic": DriverInfo("drivers.synthetic", "virtual",
                            "Generated signal, for tests and demos"),
}


class UnknownDriver(LookupError):
    pass


def builder(driver: str) -> Callable[..., Sensor]:
    """The ``build(cfg, ctx)`` function of a driver module."""
    info = DRIVERS.get(driver)
    if info is None:
        raise UnknownDriver(f"unknown driver {driver!r}; known: {', '.join(sorted(DRIVERS))}")
    module = importlib.import_module(info.module)
    build: Callable[..., Sensor] = module.build
    return build


def build_sensor(cfg: object, ctx: BuildContext) -> Sensor:
    return builder(cfg.driver)(cfg, ctx)  # type: ignore[attr-defined]
