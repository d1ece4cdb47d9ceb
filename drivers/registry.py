"""The table of known drivers: name -> module, bus kind, valid I2C addresses and emulator.

Modules are imported lazily, so a gateway only loads the drivers its config names and a broken
optional driver cannot stop the others.

A driver never knows its emulator. For ``port = "emulated"`` (serial) or ``bus = "emulated"``
(I2C), ``build_sensor`` first calls ``emulate(cfg, ctx)`` in the driver's emulator module: a
serial emulator returns a device on a pty, whose path the driver then gets as its port; an I2C
emulator attaches a chip to the agent's emulated bus.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from drivers.base import BuildContext, Emulation, Sensor

Kind = Literal["i2c", "serial", "bridge", "virtual"]


@dataclass(frozen=True)
class DriverInfo:
    module: str
    kind: Kind
    description: str
    addresses: tuple[int, ...] = ()  # I2C addresses the chip can be strapped to
    emulator: str = ""  # module with ``emulate(cfg, ctx)`` for an "emulated" port or bus


def _range(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


DRIVERS: dict[str, DriverInfo] = {
    "bme280": DriverInfo("drivers.i2c.bme280", "i2c", "Bosch BME280 temperature/humidity/pressure",
                         (0x76, 0x77), "drivers.emulated.bme280"),
    "ina219": DriverInfo("drivers.i2c.ina219", "i2c", "TI INA219 DC bus voltage/current/power",
                         _range(0x40, 0x4F), "drivers.emulated.ina219"),
    "ads1115": DriverInfo("drivers.i2c.ads1115", "i2c", "TI ADS1115 16-bit ADC",
                          _range(0x48, 0x4B), "drivers.emulated.ads1115"),
    "ops243": DriverInfo("drivers.serial.ops243", "serial", "OmniPreSense OPS243-A Doppler radar",
                         emulator="drivers.emulated.ops243"),
    "pzem004t": DriverInfo("drivers.serial.pzem004t", "serial", "PZEM-004T v3 AC energy meter",
                           emulator="drivers.emulated.pzem004t"),
    "pms5003": DriverInfo("drivers.serial.pms5003", "serial",
                          "Plantower PMS5003 particulate sensor",
                          emulator="drivers.emulated.pms5003"),
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


EMULATED = "emulated"


def build_sensor(cfg: Any, ctx: BuildContext) -> Sensor:
    """Build the sensor of ``cfg`` (a SensorConfig), with its emulator if it asks for one."""
    build = builder(cfg.driver)
    info = DRIVERS[cfg.driver]
    if not info.emulator:
        return build(cfg, ctx)
    if info.kind == "i2c" and cfg.bus == EMULATED:
        importlib.import_module(info.emulator).emulate(cfg, ctx)
        return build(cfg, ctx)
    if info.kind == "serial" and cfg.port == EMULATED:
        device: Emulation = importlib.import_module(info.emulator).emulate(cfg, ctx)
        sensor = build(cfg.model_copy(update={"port": device.path}), ctx)
        sensor.emulator = device
        return sensor
    return build(cfg, ctx)
