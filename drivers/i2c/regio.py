"""Register access to one I2C device, with OS errors turned into driver errors.

Blocking: these methods run on the bus worker thread (see ``drivers.i2c.bus``). Every error
names the bus, the address and the register, e.g. ``i2c-1 0x76 reg 0xD0: no ACK (device
absent?)``, because that is what a technician at the cabinet needs.

Errors::

    DeviceNotReady (drivers.base)
    ├── I2CNoAck        the address was not acknowledged: device absent, unpowered or busy
    └── I2CBusFault     any other OS error (EIO, adapter timeout): the bus handle is suspect
"""

from __future__ import annotations

import ctypes
import errno

from smbus2 import i2c_msg

from drivers.base import DeviceNotReady
from drivers.i2c.bus import SMBusLike

NACK_ERRNOS = frozenset({errno.EREMOTEIO, errno.ENXIO})


class I2CNoAck(DeviceNotReady):
    """The device did not acknowledge its address."""


class I2CBusFault(DeviceNotReady):
    """The adapter reported an error other than a NACK."""

    def __init__(self, message: str, *, where: str = "", errno_: int | None = None) -> None:
        super().__init__(message, where=where)
        self.errno = errno_


def hex8(value: int) -> str:
    return f"0x{value:02X}"


def hex16(value: int) -> str:
    return f"0x{value:04X}"


def bus_error(exc: OSError, where: str) -> DeviceNotReady:
    """The driver error for an OS error from one transfer."""
    if exc.errno in NACK_ERRNOS:
        return I2CNoAck("no ACK (device absent?)", where=where)
    if exc.errno == errno.ETIMEDOUT:
        reason = "bus timed out (SDA or SCL held low?)"
    elif exc.errno == errno.EAGAIN:
        reason = "arbitration lost (another controller or noise on the bus?)"
    else:
        reason = f"I/O error: {exc.strerror or exc} (errno {exc.errno})"
    return I2CBusFault(reason, where=where, errno_=exc.errno)


class RegisterIO:
    """8- and 16-bit register transfers to ``address`` on any smbus2-compatible bus."""

    def __init__(self, bus: SMBusLike, address: int, label: str) -> None:
        self.bus = bus
        self.address = address
        self.label = label

    def where(self, register: int | None = None) -> str:
        here = f"{self.label} {hex8(self.address)}"
        return here if register is None else f"{here} reg {hex8(register)}"

    def read_u8(self, register: int) -> int:
        try:
            return int(self.bus.read_byte_data(self.address, register)) & 0xFF
        except OSError as exc:
            raise bus_error(exc, self.where(register)) from exc

    def write_u8(self, register: int, value: int) -> None:
        try:
            self.bus.write_byte_data(self.address, register, value & 0xFF)
        except OSError as exc:
            raise bus_error(exc, self.where(register)) from exc

    def read_block(self, register: int, length: int) -> bytes:
        """``length`` bytes from ``register`` on, in one transfer (the chip auto-increments)."""
        try:
            data = self.bus.read_i2c_block_data(self.address, register, length)
        except OSError as exc:
            raise bus_error(exc, self.where(register)) from exc
        if len(data) != length:
            raise I2CBusFault(f"short read: {len(data)} of {length} bytes",
                              where=self.where(register))
        return bytes(data)

    def read_u16_be(self, register: int) -> int:
        """A big-endian 16-bit register: pointer write, repeated start, two-byte read."""
        write = i2c_msg.write(self.address, [register])
        read = i2c_msg.read(self.address, 2)
        try:
            self.bus.i2c_rdwr(write, read)
        except OSError as exc:
            raise bus_error(exc, self.where(register)) from exc
        hi, lo = ctypes.string_at(read.buf, 2)
        return (hi << 8) | lo

    def write_u16_be(self, register: int, value: int) -> None:
        try:
            self.bus.write_i2c_block_data(self.address, register,
                                          [(value >> 8) & 0xFF, value & 0xFF])
        except OSError as exc:
            raise bus_error(exc, self.where(register)) from exc


def to_s16(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value
