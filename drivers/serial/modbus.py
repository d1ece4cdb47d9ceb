"""Modbus-RTU framing: CRC-16/MODBUS, request builders and resynchronising frame parsers.

Wire format (Modbus over serial line v1.02, section 2.5.1)::

    [address:1] [function:1] [data:n] [crc:2, low byte first]

Replies by function code (``count`` registers requested)::

    0x01 / 0x02 read bits        addr fc bytecount(=ceil(count/8)) bits crc     5 + ceil(count/8)
    0x03 / 0x04 read registers   addr fc bytecount(=2*count) data[2*count] crc   5 + 2*count bytes
    0x06 write single register   addr fc reg_hi reg_lo val_hi val_lo crc        8 bytes (echo)
    0x42 PZEM reset energy       addr fc crc                                    4 bytes (echo)
    exception                    addr fc|0x80 code crc                          5 bytes

RTU frames are delimited by line silence, which a host behind a USB adapter cannot see, so the
parsers here delimit by content: a candidate header fixes the length, the CRC confirms it, and a
failed candidate costs one byte, never a whole frame (a real frame right behind garbage is
still found). No I/O here.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Count = Callable[[str, int], None]


def no_count(key: str, n: int) -> None:
    """A ``Count`` that counts nothing."""


class Tally:
    """Counts through to the caller and remembers CRC errors: a transaction that saw one
    failed on a bad reply, not on silence."""

    def __init__(self, count: Count) -> None:
        self.count = count
        self.crc_errors = 0

    def __call__(self, key: str, n: int) -> None:
        if key == "crc_errors":
            self.crc_errors += n
        self.count(key, n)

FC_READ_COILS = 0x01
FC_READ_DISCRETE = 0x02
FC_READ_HOLDING = 0x03
FC_READ_INPUT = 0x04
FC_WRITE_SINGLE = 0x06
FC_PZEM_RESET_ENERGY = 0x42  # PZEM-004T v3 manual: non-standard "reset energy"
EXCEPTION_FLAG = 0x80
BROADCAST_GENERAL = 0xF8  # PZEM "general" address: any single meter answers

# Standard exception codes (Modbus application protocol v1.1b3, section 7).
EXCEPTION_NAMES = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
}

def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC16_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (reflected poly 0xA001, init 0xFFFF); check value 0x4B37 for b"123456789".
    Byte-wise from a table: a frame of 256 bytes takes tens of microseconds in pure Python."""
    crc = 0xFFFF
    table = _CRC16_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<H", crc16(body))


def crc_ok(frame: bytes) -> bool:
    return len(frame) >= 3 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def read_registers_request(address: int, start: int, count: int, fc: int = FC_READ_INPUT) -> bytes:
    _check_address(address)
    if not 1 <= count <= 125:
        raise ValueError(f"register count {count} outside 1..125")
    return with_crc(struct.pack(">BBHH", address, fc, start, count))


MAX_READ_BITS = 2000  # Modbus application protocol v1.1b3, 6.1/6.2: 0x0001..0x07D0
MAX_READ_REGISTERS = 125  # ibid. 6.3/6.4: 0x0001..0x007D


def read_bits_request(address: int, start: int, count: int, fc: int = FC_READ_COILS) -> bytes:
    _check_address(address)
    if not 1 <= count <= MAX_READ_BITS:
        raise ValueError(f"bit count {count} outside 1..{MAX_READ_BITS}")
    return with_crc(struct.pack(">BBHH", address, fc, start, count))


def write_register_request(address: int, register: int, value: int) -> bytes:
    _check_address(address)
    return with_crc(struct.pack(">BBHH", address, FC_WRITE_SINGLE, register, value & 0xFFFF))


def reset_energy_request(address: int) -> bytes:
    _check_address(address)
    return with_crc(bytes((address, FC_PZEM_RESET_ENERGY)))


def _check_address(address: int) -> None:
    if not 0x01 <= address <= BROADCAST_GENERAL:
        raise ValueError(f"Modbus address {address:#04x} outside 0x01..0xF8")


@dataclass(frozen=True, slots=True)
class Frame:
    """One CRC-checked RTU frame. ``data`` excludes address, function and CRC."""

    address: int
    function: int
    data: bytes

    @property
    def is_exception(self) -> bool:
        return bool(self.function & EXCEPTION_FLAG)

    @property
    def exception_code(self) -> int:
        return self.data[0] if self.is_exception and self.data else 0

    def registers(self) -> tuple[int, ...]:
        """Register values of a 0x03/0x04 reply (after its byte count)."""
        payload = self.data[1:]
        return struct.unpack(f">{len(payload) // 2}H", payload[: len(payload) // 2 * 2])

    def bits(self, count: int) -> tuple[bool, ...]:
        """Bit values of a 0x01/0x02 reply: the first bit is the low bit of the first byte."""
        payload = self.data[1:]
        return tuple(bool(payload[i // 8] >> (i % 8) & 1) for i in range(count))

    def to_bytes(self) -> bytes:
        return with_crc(bytes((self.address, self.function)) + self.data)


def _noop_count(key: str, n: int) -> None:
    pass


class _Parser:
    """Shared resync loop: subclasses say how long a frame starting here would be."""

    cap: int

    def __init__(self, count: Count | None = None) -> None:
        self.buffer = bytearray()
        self._count = count or _noop_count

    def _length(self, buf: bytearray) -> int | None:
        """Frame length if ``buf`` starts with a plausible header, 0 if it cannot, None if more
        bytes are needed to tell."""
        raise NotImplementedError

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        buf = self.buffer
        buf += data
        skipped = 0
        while len(buf) >= 2:
            n = self._length(buf)
            if n is None:
                break
            if n == 0:
                del buf[0]
                skipped += 1
                continue
            if len(buf) < n:
                break
            raw = bytes(buf[:n])
            if not crc_ok(raw):
                self._count("crc_errors", 1)
                log.debug("modbus: CRC mismatch in candidate %s", raw.hex(" "))
                del buf[0]
                skipped += 1
                continue
            del buf[:n]
            out.append(Frame(raw[0], raw[1], raw[2:-2]))
        if len(buf) > self.cap:  # cannot happen with the length rules; keeps the bound explicit
            skipped += len(buf) - self.cap
            del buf[: len(buf) - self.cap]
        if skipped:
            self._count("garbage_bytes", skipped)
            log.debug("modbus: skipped %d byte(s) while resynchronising", skipped)
        return out

    def reset(self) -> None:
        self.buffer.clear()


class ReplyParser(_Parser):
    """Replies from one server to one outstanding request (address, function, register count)."""

    def __init__(
        self, address: int, function: int, count: int = 0, on_count: Count | None = None
    ) -> None:
        super().__init__(on_count)
        self.address = address
        self.function = function
        self.count = count
        if function in (FC_READ_HOLDING, FC_READ_INPUT):
            self.normal_length = 5 + 2 * count
        elif function in (FC_READ_COILS, FC_READ_DISCRETE):
            self.normal_length = 5 + (count + 7) // 8
        elif function == FC_WRITE_SINGLE:
            self.normal_length = 8
        elif function == FC_PZEM_RESET_ENERGY:
            self.normal_length = 4
        else:
            raise ValueError(f"no reply shape known for function {function:#04x}")
        self.cap = max(self.normal_length, 5)

    def _length(self, buf: bytearray) -> int | None:
        if self.address != BROADCAST_GENERAL and buf[0] != self.address:
            return 0
        fc = buf[1]
        if fc == self.function | EXCEPTION_FLAG:
            return 5
        if fc != self.function:
            return 0
        if self.function in (FC_READ_HOLDING, FC_READ_INPUT, FC_READ_COILS, FC_READ_DISCRETE):
            if len(buf) < 3:
                return None
            if buf[2] != self.normal_length - 5:
                return 0
        return self.normal_length


_REQUEST_LENGTHS = {
    FC_READ_COILS: 8,
    FC_READ_DISCRETE: 8,
    FC_READ_HOLDING: 8,
    FC_READ_INPUT: 8,
    FC_WRITE_SINGLE: 8,
    FC_PZEM_RESET_ENERGY: 4,
}


class RequestParser(_Parser):
    """Requests as a server sees them (the meter emulator's side of the line)."""

    cap = 8

    def _length(self, buf: bytearray) -> int | None:
        if not 0x01 <= buf[0] <= BROADCAST_GENERAL:
            return 0
        return _REQUEST_LENGTHS.get(buf[1], 0)


def describe_bad_reply(raw: bytes | bytearray, address: int, function: int,
                       length: int) -> tuple[str, str]:
    """Why ``raw`` (everything received after a request, no good frame in it) is not the reply:
    a counter key and a message. A CRC-valid frame of another server or function is named as
    such; a start that matches but ends early is truncated; anything else is line noise."""
    raw = bytes(raw)
    if len(raw) >= 4 and crc_ok(raw):
        if raw[0] != address:
            return "wrong_address", (f"a reply from address {raw[0]:#04x}, not {address:#04x} "
                                     f"({raw[:16].hex(' ')})")
        if raw[1] not in (function, function | EXCEPTION_FLAG):
            return "wrong_function", (f"a reply to function {raw[1]:#04x}, not {function:#04x} "
                                      f"({raw[:16].hex(' ')})")
        return "wrong_length", f"a reply of {len(raw)} bytes, expected {length}"
    if raw[:1] == bytes((address,)) and raw[1:2] in (b"", bytes((function,))) \
            and len(raw) < length:
        return "truncated", (f"a truncated reply: {len(raw)} of {length} bytes "
                             f"({raw[:16].hex(' ')})")
    return "garbage_replies", f"{len(raw)} bytes that are no reply ({raw[:16].hex(' ')})"


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, f"exception {code:#04x}")
