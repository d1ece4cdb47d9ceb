"""Register values to numbers and back: types, word and byte order, bit fields, scale, offset.

A value of N registers arrives as words w0..wN-1 in request order. The order names where the
bytes of the big-endian value ``A B C D`` (for 32 bits) stand on the wire:

    ABCD  words most significant first, bytes high first      (Modbus's own big-endian)
    CDAB  words least significant first, bytes high first     ("word swapped", many meters)
    BADC  words most significant first, bytes low first       ("byte swapped")
    DCBA  words least significant first, bytes low first      (little-endian)

For 64-bit values the same two rules apply: word order reverses all four words, byte order
swaps the bytes inside each word. No I/O here.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Final, Literal

Type = Literal["u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "bool"]
Order = Literal["ABCD", "CDAB", "BADC", "DCBA"]

TYPES: Final[tuple[str, ...]] = ("u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "bool")
ORDERS: Final[tuple[str, ...]] = ("ABCD", "CDAB", "BADC", "DCBA")
WORDS: Final[dict[str, int]] = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "u64": 4, "i64": 4,
                                "f32": 2, "f64": 4, "bool": 1}
_FORMAT: Final[dict[str, str]] = {"u16": "H", "i16": "h", "u32": "I", "i32": "i", "u64": "Q",
                                  "i64": "q", "f32": "f", "f64": "d", "bool": "H"}


def to_bytes(words: Sequence[int], order: str) -> bytes:
    """The big-endian bytes of the value carried by ``words`` in ``order``."""
    ws = list(words)
    if order in ("CDAB", "DCBA"):
        ws.reverse()
    raw = b"".join(w.to_bytes(2, "big") for w in ws)
    if order in ("BADC", "DCBA"):
        raw = bytes(b for i in range(0, len(raw), 2) for b in (raw[i + 1], raw[i]))
    return raw


def from_bytes(raw: bytes, order: str) -> list[int]:
    """The inverse of ``to_bytes``: the words that carry big-endian ``raw`` in ``order``."""
    if order in ("BADC", "DCBA"):
        raw = bytes(b for i in range(0, len(raw), 2) for b in (raw[i + 1], raw[i]))
    ws = [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]
    if order in ("CDAB", "DCBA"):
        ws.reverse()
    return ws


def decode(words: Sequence[int], type_: str, order: str = "ABCD") -> int | float:
    """The raw number (before scale and offset) carried by ``words``."""
    n = WORDS[type_]
    if len(words) != n:
        raise ValueError(f"{type_} takes {n} register(s), got {len(words)}")
    value: int | float = struct.unpack(">" + _FORMAT[type_], to_bytes(words, order))[0]
    return value


def encode(value: int | float, type_: str, order: str = "ABCD") -> list[int]:
    """The words that carry ``value`` (an int for integer types) in ``order``."""
    fmt = ">" + _FORMAT[type_]
    if type_ in ("f32", "f64"):
        return from_bytes(struct.pack(fmt, float(value)), order)
    return from_bytes(struct.pack(fmt, int(value)), order)


def bit_field(raw: int, bit: int, width: int) -> int:
    """Bits ``bit .. bit+width-1`` of the unsigned ``raw``."""
    return (raw >> bit) & ((1 << width) - 1)


def unsigned(value: int, type_: str) -> int:
    """Two's complement view of a signed integer, for bit fields of signed registers."""
    return value & ((1 << (16 * WORDS[type_])) - 1)


def physical(raw: int | float, scale: float, offset: float, factor: float) -> float:
    """``(raw * scale + offset) * factor``: device units to the canonical unit.

    A decimal scale such as 0.1 has no exact binary value, so ``raw * 0.1`` can land one bit
    off the decimal result; dividing by 10 gives the correctly rounded one (2205 -> 220.5).
    """
    value = _scaled(float(raw), scale) + offset
    return _scaled(value, factor) if factor != 1.0 else value


def _scaled(x: float, scale: float) -> float:
    if scale == 1.0:
        return x
    if abs(scale) < 1.0:
        inverse = round(1.0 / scale)
        if inverse != 0 and abs(1.0 / inverse - scale) <= 1e-12 * abs(scale):
            return x / inverse
    return x * scale


def raw_for(value: float, type_: str, scale: float, offset: float, factor: float) -> int | float:
    """The raw number a device holds for canonical ``value`` (nearest, for integer types)."""
    device = value / factor if factor != 1.0 else value
    raw = (device - offset) / scale
    if type_ in ("f32", "f64"):
        return raw
    if not math.isfinite(raw):
        raise ValueError(f"{value} cannot be held by a {type_}")
    return round(raw)
