"""The table of known drivers: name -> module, bus kind, valid I2C addresses and emulator;
plus the driver plugins other packages register (``drivers.plugins``).

Modules are imported lazily, so a gateway only loads the drivers its config names and a broken
optional driver cannot stop the others.

A driver never knows its emulator. For ``port = "emulated"`` (serial) or ``bus = "emulated"``
(I2C), ``build_sensor`` first calls ``emulate(cfg, ctx)`` in the driver's emulator module: a
serial emulator returns a device on a pty, whose path the driver then gets as its port; an I2C
emulator attaches a chip to the agent's emulated bus.

A driver may validate its own ``[sensors.options]``: ``options_problems`` runs the driver's
check (``DriverInfo.options``, or a plugin's pydantic ``Options`` model) at config load.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from drivers import plugins
from drivers.base import BuildContext, Emulation, Sensor

Kind = Literal["i2c", "serial", "bridge", "virtual"]


@dataclass(frozen=True)
class DriverInfo:
    module: str
    kind: Kind
    description: str
    addresses: tuple[int, ...] = ()  # I2C addresses the chip can be strapped to
    emulator: str = ""  # module with ``emulate(cfg, ctx)`` for an "emulated" port or bus
    options: str = ""  # "module:function" returning the problems of a sensor's options
    clean: str = ""  # "module:function" returning per-quantity cleaning defaults of a sensor
    origin: str = "built-in"


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
    "modbus": DriverInfo("drivers.modbus.sensor", "serial",
                         "Any Modbus RTU/TCP device from a profile or inline points",
                         emulator="drivers.emulated.modbus",
                         options="drivers.modbus.options:problems",
                         clean="drivers.modbus.options:clean_defaults"),
    "bridge": DriverInfo("firmware_bridge.sensor", "bridge", "Sensor microcontroller over UART"),
    "synthetic": DriverInfo("drivers.synthetic", "virtual",
                            "Generated signal, for tests and demos"),
}


class UnknownDriver(LookupError):
    pass


def known() -> list[str]:
    """Every driver name a config may use: built-in ones and discovered plugins."""
    return sorted({*DRIVERS, *plugins.discover()})


def info(driver: str) -> DriverInfo:
    """The table entry of a driver; a plugin's is made from its module (imported here)."""
    if driver in DRIVERS:
        return DRIVERS[driver]
    if driver not in plugins.discover():
        raise UnknownDriver(f"unknown driver {driver!r}; known: {', '.join(known())}")
    plugin = plugins.discover()[driver]
    module = plugins.load(driver)
    kind: Kind = "serial" if getattr(module, "KIND", "") == "serial" else "virtual"
    if getattr(module, "KIND", "") == "i2c":
        kind = "i2c"
    return DriverInfo(plugin.target, kind,
                      str(getattr(module, "DESCRIPTION", "")),
                      origin=f"plugin {plugin.distribution}")


def kind_of(driver: str) -> str:
    """The bus kind for config checks; a plugin that fails to load counts as "virtual" so its
    sensors are built (and fail, reported) at run time instead of refusing the file."""
    try:
        return info(driver).kind
    except plugins.PluginError:
        return "virtual"


def table() -> list[tuple[str, DriverInfo | None, str]]:
    """(name, info or None, error) of every driver, for ``sensors drivers``."""
    out: list[tuple[str, DriverInfo | None, str]] = []
    for name in known():
        try:
            out.append((name, info(name), ""))
        except plugins.PluginError as exc:
            out.append((name, None, str(exc)))
    return out


def options_problems(driver: str, options: dict[str, Any]) -> list[str]:
    """Problems of a sensor's options by the driver's own rules ([] when it has none)."""
    if driver in DRIVERS:
        spec = DRIVERS[driver].options
        if not spec:
            return []
        module, _, func = spec.partition(":")
        check: Callable[[dict[str, Any]], list[str]] = getattr(
            importlib.import_module(module), func)
        return check(options)
    try:
        module = plugins.load(driver)
    except (plugins.PluginError, KeyError):
        return []  # reported when the sensor is built; the file itself is not wrong
    model = getattr(module, "Options", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    try:
        model.model_validate(options)
    except ValidationError as exc:
        return [f"options.{'.'.join(str(k) for k in e['loc'])}: "
                f"{str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors(include_url=False)]
    return []


def clean_defaults(driver: str, options: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Cleaning defaults a driver derives from a sensor's options (a Modbus profile's points):
    quantity -> (where they are written, `[sensors.clean.<quantity>]` keys)."""
    info_ = DRIVERS.get(driver)
    if info_ is None or not info_.clean:
        return {}
    module, _, func = info_.clean.partition(":")
    hook: Callable[[dict[str, Any]], dict[str, tuple[str, dict[str, Any]]]] = getattr(
        importlib.import_module(module), func)
    return hook(options)


def builder(driver: str) -> Callable[..., Sensor]:
    """The ``build(cfg, ctx)`` function of a driver module."""
    if driver in DRIVERS:
        module = importlib.import_module(DRIVERS[driver].module)
    elif driver in plugins.discover():
        module = plugins.load(driver)
    else:
        raise UnknownDriver(f"unknown driver {driver!r}; known: {', '.join(known())}")
    build: Callable[..., Sensor] = module.build
    return build


EMULATED = "emulated"


def build_sensor(cfg: Any, ctx: BuildContext) -> Sensor:
    """Build the sensor of ``cfg`` (a SensorConfig), with its emulator if it asks for one."""
    build = builder(cfg.driver)
    if cfg.driver not in DRIVERS:
        return build(cfg, ctx)
    info_ = DRIVERS[cfg.driver]
    if not info_.emulator:
        return build(cfg, ctx)
    if info_.kind == "i2c" and cfg.bus == EMULATED:
        importlib.import_module(info_.emulator).emulate(cfg, ctx)
        return build(cfg, ctx)
    if info_.kind == "serial" and cfg.port == EMULATED:
        device: Emulation = importlib.import_module(info_.emulator).emulate(cfg, ctx)
        sensor = build(cfg.model_copy(update={"port": device.path}), ctx)
        sensor.emulator = device
        return sensor
    return build(cfg, ctx)
