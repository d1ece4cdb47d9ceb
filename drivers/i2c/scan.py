"""Find devices on an I2C bus and name the chips this agent has drivers for.

Probing follows i2cdetect's default: an SMBus quick write, except at 0x30..0x37 and
0x50..0x5F where a quick write can corrupt an EEPROM's write-protect state, so a one-byte read
is used instead. An address claimed by a kernel driver (EBUSY) is shown as ``UU``.

Identification only *reads* registers; the one side effect is the register pointer, which
every driver here sets before each transfer anyway:

- 0x76/0x77: register 0xD0 (chip id): 0x60 BME280, 0x58 BMP280, 0x61 BME680.
- 0x48..0x4B: lo/hi threshold registers 2/3 at their power-on values 0x8000/0x7FFF mean an
  ADS1x15 (no one changes them with the comparator off, and an INA219 would need 16.38 V on
  its bus with no conversion ready to look the same); config 0x8583 also counts.
- 0x40..0x4F: config register 0 at its power-on value 0x399F means an INA219. A configured
  INA219 cannot be told apart from other parts at these addresses without writing to it, so
  such an address is reported as "ina219?".
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterable
from dataclasses import dataclass

from smbus2 import i2c_msg

from drivers.i2c import ads1115, bme280, ina219
from drivers.i2c.bus import ScanBusLike
from drivers.i2c.regio import hex8, hex16

FIRST_ADDRESS = 0x08
LAST_ADDRESS = 0x77
READ_PROBE = (range(0x30, 0x38), range(0x50, 0x60))


@dataclass(frozen=True, slots=True)
class Found:
    address: int
    busy: bool = False  # claimed by a kernel driver
    chip: str = ""  # driver name, "" if unknown; ends in "?" when only the address fits
    detail: str = ""


def probe(bus: ScanBusLike, address: int) -> Found | None:
    """Whether anything acknowledges ``address``."""
    try:
        if any(address in r for r in READ_PROBE):
            bus.read_byte(address)
        else:
            bus.write_quick(address)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return Found(address, busy=True, detail="in use by a kernel driver")
        return None  # as i2cdetect: any other failure means nothing usable answers
    return Found(address)


def _word(bus: ScanBusLike, address: int, register: int) -> int | None:
    write, read = i2c_msg.write(address, [register]), i2c_msg.read(address, 2)
    try:
        bus.i2c_rdwr(write, read)
    except OSError:
        return None
    hi, lo = ctypes.string_at(read.buf, 2)
    return (hi << 8) | lo


def identify(bus: ScanBusLike, address: int) -> tuple[str, str]:
    """(driver name or "", what was read) for a device that answered at ``address``."""
    if address in (0x76, 0x77):
        try:
            chip_id = bus.read_byte_data(address, bme280.REG_CHIP_ID)
        except OSError:
            return "", "chip id unreadable"
        name = bme280.describe_chip_id(chip_id)
        return ("bme280" if chip_id == bme280.CHIP_ID_BME280 else "",
                f"chip id {hex8(chip_id)}: {name}")
    if 0x48 <= address <= 0x4B:
        lo, hi = _word(bus, address, ads1115.REG_LO_THRESH), _word(bus, address,
                                                                   ads1115.REG_HI_THRESH)
        if (lo, hi) == (ads1115.LO_THRESH_POR, ads1115.HI_THRESH_POR):
            return "ads1115", (f"thresholds {hex16(ads1115.LO_THRESH_POR)}/"
                               f"{hex16(ads1115.HI_THRESH_POR)} (power-on values)")
        config = _word(bus, address, ads1115.REG_CONFIG)
        if config == ads1115.CONFIG_POR:
            return "ads1115", f"config {hex16(ads1115.CONFIG_POR)} (power-on value)"
    if 0x40 <= address <= 0x4F:
        config = _word(bus, address, ina219.REG_CONFIG)
        if config == ina219.CONFIG_POR:
            return "ina219", f"config {hex16(ina219.CONFIG_POR)} (power-on value)"
        shown = "unreadable" if config is None else hex16(config)
        if 0x48 <= address <= 0x4B:
            return "ina219?", f"config {shown}; could also be a configured ADS1115"
        return "ina219?", f"config {shown}; address fits, identity not confirmed"
    return "", ""


def scan(bus: ScanBusLike, first: int = FIRST_ADDRESS, last: int = LAST_ADDRESS) -> list[Found]:
    found = []
    for address in range(first, last + 1):
        hit = probe(bus, address)
        if hit is None:
            continue
        if not hit.busy:
            chip, detail = identify(bus, address)
            hit = Found(address, False, chip, detail)
        found.append(hit)
    return found


def render_grid(found: Iterable[Found], first: int = FIRST_ADDRESS,
                last: int = LAST_ADDRESS) -> str:
    """An i2cdetect-style table: the address where something answered, ``--`` where not."""
    marks = {f.address: "UU" if f.busy else f"{f.address:02x}" for f in found}
    lines = ["     " + "  ".join(f"{c:x}" for c in range(16))]
    for row in range(0, 0x80, 0x10):
        cells = []
        for col in range(16):
            a = row + col
            cells.append(marks.get(a, "--") if first <= a <= last else "  ")
        lines.append((f"{row:02x}: " + " ".join(cells)).rstrip())
    return "\n".join(lines)


def render_found(found: Iterable[Found]) -> str:
    lines = []
    for f in found:
        label = f.chip or "unknown"
        lines.append(f"{hex8(f.address)}  {label:<9} {f.detail}".rstrip())
    return "\n".join(lines)
