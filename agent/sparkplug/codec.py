"""Sparkplug B payloads on the protobuf wire, for the part of the specification's schema the
agent uses (``Payload`` and ``Metric`` with scalar values and a property set).

Written by hand rather than generated: it keeps ``protobuf`` off the gateway, and the subset is
small. The tests check it against the specification's schema compiled by ``protoc`` and decoded
by Google's protobuf runtime (an independent implementation).

Wire format (protobuf, proto2)::

    key = (field_number << 3) | wire_type     varint
    wire type 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32

    Payload      1 timestamp u64   2 metrics Metric*   3 seq u64   4 uuid str   5 body bytes
    Metric       1 name str   2 alias u64   3 timestamp u64   4 datatype u32
                 5 is_historical bool   6 is_transient bool   7 is_null bool   9 properties
                 10 int_value u32   11 long_value u64   12 float_value f32
                 13 double_value f64   14 boolean_value bool   15 string_value str
    PropertySet  1 keys str*   2 values PropertyValue*
    PropertyValue 1 type u32   2 is_null bool   3 int_value u32   4 long_value u64
                 5 float_value f32   6 double_value f64   7 boolean_value bool   8 string_value

Signed integers travel as their two's complement in the unsigned field (Sparkplug 3.0, 6.4.16).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

MAX_PAYLOAD_BYTES = 1 << 20  # a command bigger than this is refused unread
MAX_METRICS = 10_000


class DataType(IntEnum):
    """Sparkplug B datatypes (specification 6.4.16) that the agent sends or reads."""

    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14


INT32_TYPES = {DataType.INT8, DataType.INT16, DataType.INT32, DataType.UINT8, DataType.UINT16,
               DataType.UINT32}
INT64_TYPES = {DataType.INT64, DataType.UINT64, DataType.DATETIME}
STRING_TYPES = {DataType.STRING, DataType.TEXT}


class SparkplugDecodeError(ValueError):
    """Bytes that are not a Sparkplug B payload of the supported shape; says where."""


Value = bool | int | float | str | None


@dataclass(frozen=True)
class Metric:
    name: str | None
    datatype: DataType | None
    value: Value
    timestamp: int | None = None  # ms since the epoch
    alias: int | None = None
    is_historical: bool = False
    properties: dict[str, tuple[DataType, Value]] = field(default_factory=dict)


@dataclass(frozen=True)
class Payload:
    metrics: list[Metric]
    timestamp: int | None = None
    seq: int | None = None


# -- encoding --------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"varint of a negative number: {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(num: int, wire: int) -> bytes:
    return _varint(num << 3 | wire)


def _len(num: int, data: bytes) -> bytes:
    return _key(num, 2) + _varint(len(data)) + data


def _value_field(base: int, dt: DataType, value: Value) -> bytes:
    """The value field of a Metric (base 10) or a PropertyValue (base 3)."""
    if dt in INT32_TYPES:
        assert isinstance(value, int) and not isinstance(value, bool)
        return _key(base, 0) + _varint(value & 0xFFFFFFFF)
    if dt in INT64_TYPES:
        assert isinstance(value, int) and not isinstance(value, bool)
        return _key(base + 1, 0) + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if dt is DataType.FLOAT:
        assert isinstance(value, (int, float))
        return _key(base + 2, 5) + struct.pack("<f", value)
    if dt is DataType.DOUBLE:
        assert isinstance(value, (int, float))
        return _key(base + 3, 1) + struct.pack("<d", value)
    if dt is DataType.BOOLEAN:
        return _key(base + 4, 0) + _varint(1 if value else 0)
    if dt in STRING_TYPES:
        assert isinstance(value, str)
        return _len(base + 5, value.encode())
    raise ValueError(f"unsupported datatype {dt!r}")


def _property_set(props: dict[str, tuple[DataType, Value]]) -> bytes:
    out = b"".join(_len(1, k.encode()) for k in props)
    for dt, value in props.values():
        pv = _key(1, 0) + _varint(dt)
        pv += _key(2, 0) + b"\x01" if value is None else _value_field(3, dt, value)
        out += _len(2, pv)
    return out


def encode_metric(m: Metric) -> bytes:
    out = b""
    if m.name is not None:
        out += _len(1, m.name.encode())
    if m.alias is not None:
        out += _key(2, 0) + _varint(m.alias)
    if m.timestamp is not None:
        out += _key(3, 0) + _varint(m.timestamp)
    if m.datatype is not None:
        out += _key(4, 0) + _varint(m.datatype)
    if m.is_historical:
        out += _key(5, 0) + b"\x01"
    if m.properties:
        out += _len(9, _property_set(m.properties))
    if m.value is None or (isinstance(m.value, float) and not math.isfinite(m.value)
                           and m.datatype not in (DataType.FLOAT, DataType.DOUBLE)):
        out += _key(7, 0) + b"\x01"  # is_null
    elif m.datatype is not None:
        out += _value_field(10, m.datatype, m.value)
    return out


def encode(p: Payload) -> bytes:
    out = b""
    if p.timestamp is not None:
        out += _key(1, 0) + _varint(p.timestamp)
    for m in p.metrics:
        out += _len(2, encode_metric(m))
    if p.seq is not None:
        out += _key(3, 0) + _varint(p.seq)
    return out


# -- decoding (commands from the host: hostile until parsed) ---------------------------------

Field = tuple[int, int, Any]  # number, wire type, value (int or bytes)


def _fields(data: bytes, where: str) -> list[Field]:
    out: list[Field] = []
    i, n = 0, len(data)
    while i < n:
        key, i = _read_varint(data, i, where)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise SparkplugDecodeError(f"{where}: field number 0 at byte {i}")
        value: int | bytes
        if wire == 0:
            value, i = _read_varint(data, i, where)
        elif wire == 1:
            if i + 8 > n:
                raise SparkplugDecodeError(f"{where}: truncated fixed64 at byte {i}")
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            size, i = _read_varint(data, i, where)
            if i + size > n:
                raise SparkplugDecodeError(f"{where}: field {num} runs past the end")
            value, i = data[i:i + size], i + size
        elif wire == 5:
            if i + 4 > n:
                raise SparkplugDecodeError(f"{where}: truncated fixed32 at byte {i}")
            value, i = data[i:i + 4], i + 4
        else:
            raise SparkplugDecodeError(f"{where}: unsupported wire type {wire} at byte {i}")
        out.append((num, wire, value))
    return out


def _read_varint(data: bytes, i: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(data):
            raise SparkplugDecodeError(f"{where}: truncated varint")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift >= 70:
            raise SparkplugDecodeError(f"{where}: varint longer than 10 bytes")


def _expect(wire: int, want: int, what: str) -> None:
    if wire != want:
        raise SparkplugDecodeError(f"{what}: wire type {wire}, expected {want}")


def _text(raw: Any, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise SparkplugDecodeError(f"{what}: not UTF-8") from None


def decode_metric(data: bytes, where: str) -> Metric:
    name: str | None = None
    alias = timestamp = None
    datatype: DataType | None = None
    historical = False
    value: Value = None
    for num, wire, raw in _fields(data, where):
        if num == 1:
            _expect(wire, 2, f"{where}.name")
            name = _text(raw, f"{where}.name")
        elif num in (2, 3):
            _expect(wire, 0, f"{where} field {num}")
            alias, timestamp = (raw, timestamp) if num == 2 else (alias, raw)
        elif num == 4:
            _expect(wire, 0, f"{where}.datatype")
            try:
                datatype = DataType(raw)
            except ValueError:
                raise SparkplugDecodeError(f"{where}.datatype: unsupported {raw}") from None
        elif num == 5:
            historical = bool(raw)
        elif num in (10, 11, 14):
            _expect(wire, 0, f"{where} value")
            value = bool(raw) if num == 14 else raw
        elif num == 12:
            _expect(wire, 5, f"{where}.float_value")
            value = struct.unpack("<f", raw)[0]
        elif num == 13:
            _expect(wire, 1, f"{where}.double_value")
            value = struct.unpack("<d", raw)[0]
        elif num == 15:
            _expect(wire, 2, f"{where}.string_value")
            value = _text(raw, f"{where}.string_value")
        # other fields (metadata, properties, datasets, ...) are skipped: not used in commands
    return Metric(name, datatype, value, timestamp, alias, historical)


def decode(data: bytes) -> Payload:
    """Parse a payload; raise SparkplugDecodeError (never anything else) on bad bytes."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SparkplugDecodeError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    metrics: list[Metric] = []
    timestamp = seq = None
    for num, wire, raw in _fields(data, "payload"):
        if num == 1:
            _expect(wire, 0, "payload.timestamp")
            timestamp = raw
        elif num == 2:
            _expect(wire, 2, "payload.metrics")
            if len(metrics) >= MAX_METRICS:
                raise SparkplugDecodeError(f"payload: more than {MAX_METRICS} metrics")
            metrics.append(decode_metric(raw, f"payload.metrics[{len(metrics)}]"))
        elif num == 3:
            _expect(wire, 0, "payload.seq")
            seq = raw
    return Payload(metrics, timestamp, seq)
