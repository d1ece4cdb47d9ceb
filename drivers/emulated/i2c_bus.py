"""An emulated I2C bus with smbus2's call surface, routing transactions to chips by address.

Each chip sees the bus the way a real device does: an I2C *write* (the register pointer, then
data) and an I2C *read* (bytes from the current pointer). The smbus2 calls are expressed in
those terms exactly as the Linux i2c-dev layer puts them on the wire, e.g.
``read_byte_data(a, r)`` is "write [r], repeated start, read 1".

A transaction to an address where nobody acknowledges (no chip, a chip unplugged, or a chip in
a NACK storm) raises ``OSError(EREMOTEIO)``, which is what smbus2 raises on Linux. Every call is
appended to ``log`` (bounded) in the shape of the smbus2 call, e.g.
``("write_byte_data", 0x76, 0xF4, 0x25)`` or ``("read_i2c_block_data", 0x76, 0xF7, 8)``;
``i2c_rdwr`` entries list their messages as ``("w", addr, b"...")`` / ``("r", addr, n)``.

Calls may come from a bus worker thread while a test or the demo injects faults from the event
loop thread, so every transaction and fault hook holds one lock.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from smbus2 import i2c_msg

TimeFn = Callable[[], float]
"""Seconds as a float: a monotonic source for conversion timing, or epoch seconds for the
environment model (time of day)."""

I2C_M_RD = 0x0001  # i2c_msg flag: this message reads (linux/i2c.h)
SMBUS_BLOCK_MAX = 32  # smbus2 refuses longer block transfers with ValueError


def nack_error() -> OSError:
    """The error smbus2 raises on Linux when an address is not acknowledged."""
    return OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))


class EmulatedChip(abc.ABC):
    """A device on the emulated bus, with the faults shared by every chip.

    Fault hooks: ``unplug()`` (the chip stops acknowledging), ``replug()`` (it answers again,
    after a power-on reset, as a re-connected chip would), ``nack_storm(n)`` (the next ``n``
    bus calls addressed to it are not acknowledged) and ``power_on_reset()``.
    """

    kind = "chip"

    def __init__(self, clock: TimeFn = time.monotonic) -> None:
        self.clock = clock
        self.present = True
        self.nacks = 0  # transactions this chip refused, for tests and the demo's health view
        self._nack_left = 0
        self.lock = threading.RLock()

    # --- wire level, implemented per chip -------------------------------------------------
    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """An I2C write: first byte is the register pointer, then data (may be empty)."""

    @abc.abstractmethod
    def read(self, length: int) -> bytes:
        """An I2C read of ``length`` bytes from the current pointer."""

    @abc.abstractmethod
    def power_on_reset(self) -> None:
        """Registers back to their power-on values."""

    # --- fault hooks ----------------------------------------------------------------------
    def unplug(self) -> None:
        with self.lock:
            self.present = False

    def replug(self) -> None:
        with self.lock:
            self.present = True
            self.power_on_reset()

    def nack_storm(self, transactions: int) -> None:
        with self.lock:
            self._nack_left = max(0, int(transactions))

    def acknowledges(self) -> bool:
        """Whether the chip acknowledges its address for the next bus call (consumes a storm)."""
        if not self.present:
            self.nacks += 1
            return False
        if self._nack_left > 0:
            self._nack_left -= 1
            self.nacks += 1
            return False
        return True


class WordRegisterChip(EmulatedChip):
    """A chip with a pointer register selecting 16-bit big-endian registers (INA219, ADS1115).

    A write of one byte only moves the pointer; a write of three bytes sets a register; a read
    returns the pointed register MSB first (repeating if more bytes are clocked out).
    """

    pointer_mask = 0xFF

    def __init__(self, clock: TimeFn = time.monotonic) -> None:
        super().__init__(clock)
        self.pointer = 0

    @abc.abstractmethod
    def read_register(self, pointer: int) -> int: ...

    @abc.abstractmethod
    def write_register(self, pointer: int, value: int) -> None: ...

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0] & self.pointer_mask
        if len(data) >= 3:
            self.write_register(self.pointer, (data[1] << 8) | data[2])

    def read(self, length: int) -> bytes:
        value = self.read_register(self.pointer)
        word = bytes(((value >> 8) & 0xFF, value & 0xFF))
        return (word * (length // 2 + 1))[:length]


class EmulatedI2CBus:
    """One I2C bus segment with emulated chips attached by 7-bit address."""

    def __init__(self, label: str = "i2c-emulated", log_size: int = 10_000) -> None:
        self.label = label
        self.log: deque[tuple[Any, ...]] = deque(maxlen=log_size)
        self.nacks = 0
        self._chips: dict[int, EmulatedChip] = {}
        self._lock = threading.RLock()

    # --- wiring ----------------------------------------------------------------------------
    def attach(self, address: int, chip: EmulatedChip) -> EmulatedChip:
        if not 0x03 <= address <= 0x77:
            raise ValueError(f"{address:#04x} is not a 7-bit I2C device address")
        with self._lock:
            if address in self._chips:
                raise ValueError(f"{self.label}: address 0x{address:02X} is already taken")
            self._chips[address] = chip
        return chip

    def detach(self, address: int) -> None:
        with self._lock:
            self._chips.pop(address, None)

    def chip(self, address: int) -> EmulatedChip | None:
        with self._lock:
            return self._chips.get(address)

    @property
    def chips(self) -> dict[int, EmulatedChip]:
        with self._lock:
            return dict(self._chips)

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def _target(self, address: int) -> EmulatedChip:
        chip = self._chips.get(address)
        if chip is not None:
            with chip.lock:
                if chip.acknowledges():
                    return chip
        self.nacks += 1
        raise nack_error()

    def _transfer(self, entry: tuple[Any, ...], address: int,
                  action: Callable[[EmulatedChip], Any]) -> Any:
        with self._lock:
            self.log.append(entry)
            chip = self._target(address)
            with chip.lock:
                return action(chip)

    # --- smbus2 surface --------------------------------------------------------------------
    def write_quick(self, i2c_addr: int, force: bool | None = None) -> None:
        self._transfer(("write_quick", i2c_addr), i2c_addr, lambda c: None)

    def read_byte(self, i2c_addr: int, force: bool | None = None) -> int:
        value: int = self._transfer(("read_byte", i2c_addr), i2c_addr, lambda c: c.read(1)[0])
        return value

    def write_byte(self, i2c_addr: int, value: int, force: bool | None = None) -> None:
        self._transfer(("write_byte", i2c_addr, value), i2c_addr,
                       lambda c: c.write(bytes((value & 0xFF,))))

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        def op(c: EmulatedChip) -> int:
            c.write(bytes((register,)))
            return c.read(1)[0]

        value: int = self._transfer(("read_byte_data", i2c_addr, register), i2c_addr, op)
        return value

    def write_byte_data(self, i2c_addr: int, register: int, value: int,
                        force: bool | None = None) -> None:
        self._transfer(("write_byte_data", i2c_addr, register, value), i2c_addr,
                       lambda c: c.write(bytes((register, value & 0xFF))))

    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        """SMBus word: the first byte on the wire is the low byte."""

        def op(c: EmulatedChip) -> int:
            c.write(bytes((register,)))
            lo, hi = c.read(2)
            return lo | (hi << 8)

        value: int = self._transfer(("read_word_data", i2c_addr, register), i2c_addr, op)
        return value

    def write_word_data(self, i2c_addr: int, register: int, value: int,
                        force: bool | None = None) -> None:
        self._transfer(("write_word_data", i2c_addr, register, value), i2c_addr,
                       lambda c: c.write(bytes((register, value & 0xFF, (value >> 8) & 0xFF))))

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int,
                            force: bool | None = None) -> list[int]:
        if length > SMBUS_BLOCK_MAX:
            raise ValueError(f"Desired block length over {SMBUS_BLOCK_MAX} bytes")

        def op(c: EmulatedChip) -> list[int]:
            c.write(bytes((register,)))
            return list(c.read(length))

        data: list[int] = self._transfer(("read_i2c_block_data", i2c_addr, register, length),
                                         i2c_addr, op)
        return data

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int],
                             force: bool | None = None) -> None:
        if len(data) > SMBUS_BLOCK_MAX:
            raise ValueError(f"Data length cannot exceed {SMBUS_BLOCK_MAX} bytes")
        payload = bytes([register, *data])
        self._transfer(("write_i2c_block_data", i2c_addr, register, tuple(data)), i2c_addr,
                       lambda c: c.write(payload))

    def i2c_rdwr(self, *i2c_msgs: i2c_msg) -> None:
        """Combined transfer: messages joined by repeated starts, one stop at the end."""
        entry: list[Any] = ["i2c_rdwr"]
        for m in i2c_msgs:
            if m.flags & I2C_M_RD:
                entry.append(("r", int(m.addr), int(m.len)))
            else:
                entry.append(("w", int(m.addr), ctypes.string_at(m.buf, m.len)))
        with self._lock:
            self.log.append(tuple(entry))
            acked: dict[int, EmulatedChip] = {}
            for m in i2c_msgs:
                if int(m.addr) not in acked:
                    acked[int(m.addr)] = self._target(int(m.addr))
            for m in i2c_msgs:
                chip = acked[int(m.addr)]
                with chip.lock:
                    if m.flags & I2C_M_RD:
                        data = chip.read(int(m.len))
                        ctypes.memmove(m.buf, data, len(data))
                    else:
                        chip.write(ctypes.string_at(m.buf, m.len))

    def close(self) -> None:
        """Nothing to release: the chips outlive any one handle on the bus."""

    def __enter__(self) -> EmulatedI2CBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
