"""Frame payloads <-> typed messages (PROTOCOL.md, "Messages"). Pure: no I/O.

Every message is a frozen dataclass with ``TYPE``, ``encode() -> bytes`` and
``decode(payload)``; ``decode_message(type, payload)`` dispatches on the type byte. All integers
are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from firmware_bridge.errors import MessageError

PROTOCOL_VERSION = 1
UID_BYTES = 8
SHA256_BYTES = 32
MAX_TEXT_BYTES = 200  # NAK detail and LOG text; longer text is cut by the sender
MAX_CHUNK_BYTES = 1024  # FW_CHUNK data; the device may ask for less in FW_STATUS


class MsgType(IntEnum):
    CONNECT = 0x01
    HELLO = 0x02
    PING = 0x03
    PONG = 0x04
    ACK = 0x05
    NAK = 0x06
    STATS_GET = 0x07
    STATS = 0x08
    READINGS = 0x10
    LOG = 0x11
    CONFIG_GET = 0x20
    CONFIG_VALUE = 0x21
    CONFIG_SET = 0x22
    REBOOT = 0x30
    FW_BEGIN = 0x40
    FW_CHUNK = 0x41
    FW_END = 0x42
    FW_COMMIT = 0x43
    FW_ABORT = 0x44
    FW_QUERY = 0x45
    FW_STATUS = 0x46


# Frames of these types are never answered (a lost one is simply lost).
NOTICE_TYPES = frozenset({MsgType.LOG})


class NakCode(IntEnum):
    UNKNOWN_TYPE = 1
    BAD_PAYLOAD = 2
    UNSUPPORTED_VERSION = 3
    UNKNOWN_KEY = 4
    INVALID_VALUE = 5
    BAD_STATE = 6
    BAD_OFFSET = 7
    VERIFY_FAILED = 8
    TOO_LARGE = 9
    BUSY = 10
    NOT_CONNECTED = 11


class ChannelKind(IntEnum):
    LOOP = 1  # inductive loop detector: vehicles and occupancy
    PULSE = 2  # S0 pulse input of an energy meter


class ConfigKey(IntEnum):
    REPORT_INTERVAL_MS = 1  # 100..60000
    PULSE_MIN_WIDTH_US = 2  # S0 debounce, 1000..100000 (S0 pulses are >= 30 ms, IEC 62053-31)
    LOOP_HOLD_MS = 3  # presence kept after the loop releases, 0..2000


class Capability(IntFlag):
    LOOP = 0x01
    PULSE = 0x02
    FW_UPDATE = 0x04
    CONFIG = 0x08
    LOG = 0x10
    STATS = 0x20


class HelloFlag(IntFlag):
    ROLLED_BACK = 0x01  # this boot fell back to the old image: the trial image did not say HELLO
    TRIAL = 0x02  # running an image that is not confirmed yet


class FwState(IntEnum):
    IDLE = 0
    RECEIVING = 1
    VERIFIED = 2


Version3 = tuple[int, int, int]


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _cut(text: str) -> bytes:
    return text.encode("utf-8")[:MAX_TEXT_BYTES]


def _unpack(fmt: struct.Struct, payload: bytes, name: str, exact: bool = True) -> tuple[int, ...]:
    if len(payload) < fmt.size or (exact and len(payload) != fmt.size):
        want = f"{fmt.size}" if exact else f"at least {fmt.size}"
        raise MessageError(f"{name} payload is {len(payload)} bytes, expected {want}")
    return fmt.unpack_from(payload)


class _Flat:
    """A message whose fields, in order, are exactly its struct's values."""

    TYPE: ClassVar[MsgType]
    _S: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return self._S.pack(*(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        return cls(*_unpack(cls._S, payload, cls.TYPE.name))


class _Empty:
    TYPE: ClassVar[MsgType]

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        if payload:
            raise MessageError(f"{cls.TYPE.name} payload is {len(payload)} bytes, expected 0")
        return cls()


@dataclass(frozen=True, slots=True)
class Connect:
    """Host -> device, first request of a session: the protocol versions the host speaks."""

    TYPE: ClassVar[MsgType] = MsgType.CONNECT
    _S: ClassVar[struct.Struct] = struct.Struct("<BB")
    min_version: int = PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return self._S.pack(self.min_version, self.max_version)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        # Trailing bytes are allowed: later protocol versions may append fields.
        lo, hi = _unpack(cls._S, payload, "CONNECT", exact=False)
        return cls(lo, hi)


@dataclass(frozen=True, slots=True)
class Hello:
    """Device -> host: answer to CONNECT, or unsolicited at boot (then it needs an ACK)."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    _S: ClassVar[struct.Struct] = struct.Struct("<BBBB8sIQIBBB")
    protocol: int
    firmware: Version3
    uid: bytes
    capabilities: Capability
    mcu_time_us: int
    boot_count: int
    active_slot: int
    flags: HelloFlag
    channels: tuple[ChannelKind, ...]

    def encode(self) -> bytes:
        return self._S.pack(self.protocol, *self.firmware, self.uid, int(self.capabilities),
                            self.mcu_time_us, self.boot_count, self.active_slot, int(self.flags),
                            len(self.channels)) + bytes(int(k) for k in self.channels)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        fields = _unpack(cls._S, payload, "HELLO", exact=False)
        proto, major, minor, patch, uid, caps, t_us, boots, slot, flags, n = fields
        kinds = payload[cls._S.size:cls._S.size + n]
        if len(kinds) != n:
            raise MessageError(f"HELLO announces {n} channels but carries {len(kinds)}")
        try:
            channels = tuple(ChannelKind(k) for k in kinds)
        except ValueError as exc:
            raise MessageError(f"HELLO channel list: {exc}") from None
        return cls(proto, (major, minor, patch), bytes(uid), Capability(caps), t_us, boots, slot,
                   HelloFlag(flags), channels)


@dataclass(frozen=True, slots=True)
class Ping(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.PING


@dataclass(frozen=True, slots=True)
class Pong(_Flat):
    TYPE: ClassVar[MsgType] = MsgType.PONG
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")
    mcu_time_us: int


@dataclass(frozen=True, slots=True)
class Ack(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.ACK


@dataclass(frozen=True, slots=True)
class Nak:
    TYPE: ClassVar[MsgType] = MsgType.NAK
    code: int
    detail: str = ""

    def encode(self) -> bytes:
        return bytes([self.code]) + _cut(self.detail)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        if not payload:
            raise MessageError("NAK payload is empty, expected a code")
        return cls(payload[0], _text(payload[1:]))


@dataclass(frozen=True, slots=True)
class StatsGet(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.STATS_GET


@dataclass(frozen=True, slots=True)
class Stats(_Flat):
    """Device-side link counters since boot."""

    TYPE: ClassVar[MsgType] = MsgType.STATS
    _S: ClassVar[struct.Struct] = struct.Struct("<7I")
    rx_frames: int
    rx_crc_errors: int
    rx_bad_frames: int
    tx_frames: int
    retransmits: int
    duplicates: int
    reports_dropped: int


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """One channel's report. ``count``: vehicles or pulses in the interval; ``total``: since boot
    (wraps at 2**32); ``occupancy_us``: time the loop was occupied in the interval (0 for pulse)."""

    _S: ClassVar[struct.Struct] = struct.Struct("<BBIII")
    channel: int
    kind: ChannelKind
    count: int
    total: int
    occupancy_us: int = 0


@dataclass(frozen=True, slots=True)
class Readings:
    """Device -> host every report interval; needs an ACK (the device retransmits)."""

    TYPE: ClassVar[MsgType] = MsgType.READINGS
    _S: ClassVar[struct.Struct] = struct.Struct("<QIB")
    mcu_time_us: int  # end of the interval, device clock
    interval_us: int
    records: tuple[ChannelRecord, ...]

    def encode(self) -> bytes:
        rec = ChannelRecord._S
        return self._S.pack(self.mcu_time_us, self.interval_us, len(self.records)) + b"".join(
            rec.pack(r.channel, int(r.kind), r.count, r.total, r.occupancy_us)
            for r in self.records)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        t_us, interval_us, n = _unpack(cls._S, payload, "READINGS", exact=False)
        rec = ChannelRecord._S
        want = cls._S.size + n * rec.size
        if len(payload) != want:
            raise MessageError(
                f"READINGS with {n} records is {len(payload)} bytes, expected {want}")
        records = []
        for i in range(n):
            ch, kind, count, total, occ = rec.unpack_from(payload, cls._S.size + i * rec.size)
            try:
                records.append(ChannelRecord(ch, ChannelKind(kind), count, total, occ))
            except ValueError:
                raise MessageError(f"READINGS record {i}: unknown channel kind {kind}") from None
        return cls(t_us, interval_us, tuple(records))


@dataclass(frozen=True, slots=True)
class Log:
    TYPE: ClassVar[MsgType] = MsgType.LOG
    _S: ClassVar[struct.Struct] = struct.Struct("<BQ")
    level: int  # Python logging levels: 10 debug, 20 info, 30 warning, 40 error
    mcu_time_us: int
    text: str

    def encode(self) -> bytes:
        return self._S.pack(self.level, self.mcu_time_us) + _cut(self.text)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        level, t_us = _unpack(cls._S, payload, "LOG", exact=False)
        return cls(level, t_us, _text(payload[cls._S.size:]))


@dataclass(frozen=True, slots=True)
class ConfigGet:
    TYPE: ClassVar[MsgType] = MsgType.CONFIG_GET
    key: int

    def encode(self) -> bytes:
        return bytes([self.key])

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        if len(payload) != 1:
            raise MessageError(f"CONFIG_GET payload is {len(payload)} bytes, expected 1")
        return cls(payload[0])


@dataclass(frozen=True, slots=True)
class ConfigValue(_Flat):
    TYPE: ClassVar[MsgType] = MsgType.CONFIG_VALUE
    _S: ClassVar[struct.Struct] = struct.Struct("<BI")
    key: int
    value: int


@dataclass(frozen=True, slots=True)
class ConfigSet(_Flat):
    TYPE: ClassVar[MsgType] = MsgType.CONFIG_SET
    _S: ClassVar[struct.Struct] = struct.Struct("<BI")
    key: int
    value: int


@dataclass(frozen=True, slots=True)
class Reboot(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.REBOOT


@dataclass(frozen=True, slots=True)
class FwBegin:
    """Start (or resume) an update: the device answers FW_STATUS with the offset to go on from."""

    TYPE: ClassVar[MsgType] = MsgType.FW_BEGIN
    _S: ClassVar[struct.Struct] = struct.Struct("<I3B32s")
    size: int
    version: Version3
    sha256: bytes

    def encode(self) -> bytes:
        return self._S.pack(self.size, *self.version, self.sha256)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        size, major, minor, patch, digest = _unpack(cls._S, payload, "FW_BEGIN")
        return cls(size, (major, minor, patch), bytes(digest))


@dataclass(frozen=True, slots=True)
class FwChunk:
    TYPE: ClassVar[MsgType] = MsgType.FW_CHUNK
    _S: ClassVar[struct.Struct] = struct.Struct("<I")
    offset: int
    data: bytes

    def encode(self) -> bytes:
        return self._S.pack(self.offset) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        (offset,) = _unpack(cls._S, payload, "FW_CHUNK", exact=False)
        data = bytes(payload[cls._S.size:])
        if not data or len(data) > MAX_CHUNK_BYTES:
            raise MessageError(f"FW_CHUNK carries {len(data)} bytes, expected 1..{MAX_CHUNK_BYTES}")
        return cls(offset, data)


@dataclass(frozen=True, slots=True)
class FwEnd(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.FW_END


@dataclass(frozen=True, slots=True)
class FwCommit(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.FW_COMMIT


@dataclass(frozen=True, slots=True)
class FwAbort(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.FW_ABORT


@dataclass(frozen=True, slots=True)
class FwQuery(_Empty):
    TYPE: ClassVar[MsgType] = MsgType.FW_QUERY


@dataclass(frozen=True, slots=True)
class FwStatus:
    """``offset``: how many bytes from the start of the image the device holds without a gap;
    an interrupted update resumes there."""

    TYPE: ClassVar[MsgType] = MsgType.FW_STATUS
    _S: ClassVar[struct.Struct] = struct.Struct("<BIIH3B32s")
    state: FwState
    offset: int
    size: int
    chunk: int
    version: Version3
    sha256: bytes

    def encode(self) -> bytes:
        return self._S.pack(int(self.state), self.offset, self.size, self.chunk, *self.version,
                            self.sha256)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        state, offset, size, chunk, major, minor, patch, digest = _unpack(
            cls._S, payload, "FW_STATUS")
        try:
            fw_state = FwState(state)
        except ValueError:
            raise MessageError(f"FW_STATUS state {state} is unknown") from None
        return cls(fw_state, offset, size, chunk, (major, minor, patch), bytes(digest))


Message = (Connect | Hello | Ping | Pong | Ack | Nak | StatsGet | Stats | Readings | Log
           | ConfigGet | ConfigValue | ConfigSet | Reboot | FwBegin | FwChunk | FwEnd | FwCommit
           | FwAbort | FwQuery | FwStatus)

_CLASSES: tuple[type[Message], ...] = (
    Connect, Hello, Ping, Pong, Ack, Nak, StatsGet, Stats, Readings, Log, ConfigGet, ConfigValue,
    ConfigSet, Reboot, FwBegin, FwChunk, FwEnd, FwCommit, FwAbort, FwQuery, FwStatus)
BY_TYPE: dict[int, type[Message]] = {cls.TYPE: cls for cls in _CLASSES}


def decode_message(msg_type: int, payload: bytes) -> Message:
    """The message in a frame's payload; MessageError names the type and what is wrong."""
    cls = BY_TYPE.get(msg_type)
    if cls is None:
        raise MessageError(f"unknown message type {msg_type:#04x}")
    try:
        return cls.decode(payload)
    except struct.error as exc:  # pragma: no cover - _unpack checks sizes first
        raise MessageError(f"{cls.TYPE.name}: {exc}") from None


def type_name(msg_type: int) -> str:
    try:
        return MsgType(msg_type).name
    except ValueError:
        return f"type {msg_type:#04x}"
