"""``edge-agent i2c scan``: an i2cdetect-style view of a bus, naming the chips we drive."""

from __future__ import annotations

import argparse
import glob
import sys
from typing import Literal

from agent import jsontext
from drivers.base import DriverError
from drivers.i2c.bus import ScanBusLike, open_smbus
from drivers.i2c.scan import render_found, render_grid, scan

# Where ``--bus emulated`` puts the chips: each one's default address.
EMULATED_CHIPS = {"bme280": 0x76, "ina219": 0x40, "ads1115": 0x48}


def emulated_scan_bus() -> ScanBusLike:
    """An emulated bus with a BME280, an INA219 and an ADS1115 at their default addresses."""
    from drivers.emulated.ads1115 import Ads1115Emulator
    from drivers.emulated.bme280 import Bme280Emulator
    from drivers.emulated.i2c_bus import EmulatedI2CBus
    from drivers.emulated.ina219 import Ina219Emulator

    bus = EmulatedI2CBus()
    bus.attach(EMULATED_CHIPS["bme280"], Bme280Emulator())
    bus.attach(EMULATED_CHIPS["ina219"], Ina219Emulator())
    bus.attach(EMULATED_CHIPS["ads1115"], Ads1115Emulator())
    return bus


def _bus_arg(text: str) -> int | Literal["emulated"]:
    if text == "emulated":
        return "emulated"
    try:
        number = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bus number or 'emulated'") from None
    if not 0 <= number <= 255:
        raise argparse.ArgumentTypeError(f"{number} is not an I2C bus number (0..255)")
    return number


def _fail(args: argparse.Namespace, message: str) -> None:
    """A failure as a line; with --json also ``{"error": ...}`` on stdout (the line goes to
    stderr then), so a script always reads JSON."""
    if args.json:
        print(jsontext.dumps({"error": message}))
    print(message, file=sys.stderr if args.json else sys.stdout)


def scan_command(args: argparse.Namespace) -> int:
    bus_name: int | Literal["emulated"] | None = args.bus
    if bus_name is None:
        adapters = sorted(glob.glob("/dev/i2c-*"))
        names = ", ".join(a.removeprefix("/dev/i2c-") for a in adapters) or "none found"
        _fail(args, f"no bus given: use --bus N (adapters here: {names}) or --bus emulated")
        return 2
    try:
        bus = emulated_scan_bus() if bus_name == "emulated" else open_smbus(bus_name)
    except DriverError as exc:
        _fail(args, f"i2c scan: {exc}")
        return 1
    label = "i2c-emulated" if bus_name == "emulated" else f"i2c-{bus_name}"
    try:
        found = scan(bus)
    finally:
        bus.close()
    if args.json:
        print(jsontext.dumps({"bus": label, "devices": [
            {"address": f.address, "chip": f.chip or None, "busy": f.busy,
             "detail": f.detail} for f in found]}, indent=2))
        return 0
    print(f"{label}:")
    print(render_grid(found))
    print()
    if found:
        print(render_found(found))
    else:
        print("no devices answered")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i2c = sub.add_parser("i2c", help="I2C bus tools")
    i2c_sub = i2c.add_subparsers(dest="i2c_command", required=True)
    p = i2c_sub.add_parser("scan", help="list devices on a bus and name known chips",
                           description="Probe every address like i2cdetect and identify "
                                       "BME280, INA219 and ADS1115 chips by reading registers "
                                       "(nothing is written but the register pointer).")
    p.add_argument("--bus", type=_bus_arg, default=None,
                   help="bus number N for /dev/i2c-N, or 'emulated'")
    p.add_argument("--json", action="store_true",
                   help="print {bus, devices: [{address, chip, busy, detail}]} as JSON")
    p.set_defaults(func=scan_command)
