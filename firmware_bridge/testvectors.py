"""Known-answer frames for the bridge protocol, stored in ``vectors/frames.json``.

The JSON file is the contract a firmware implementation (C on the MCU) is tested against: each
entry gives the wire bytes, the decoded header and the message fields. ``python -m
firmware_bridge.testvectors`` rewrites the file from the definitions below; the test suite
checks that the codec and the stored file agree in both directions.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from pathlib import Path
from typing import Any

from firmware_bridge import framing
from firmware_bridge.frames import CRC, FLAG_ANSWER, FLAG_RETRY, Frame, crc32
from firmware_bridge.messages import (
    Ack,
    Capability,
    ChannelKind,
    ChannelRecord,
    ConfigGet,
    ConfigKey,
    ConfigSet,
    ConfigValue,
    Connect,
    FwAbort,
    FwBegin,
    FwChunk,
    FwCommit,
    FwEnd,
    FwQuery,
    FwState,
    FwStatus,
    Hello,
    HelloFlag,
    Log,
    Message,
    Nak,
    NakCode,
    Ping,
    Pong,
    Readings,
    Reboot,
    Stats,
    StatsGet,
)

PATH = Path(__file__).parent / "vectors" / "frames.json"
V = 1
_SHA = bytes(range(0x10, 0x30))  # a recognisable 32-byte digest
_UID = bytes.fromhex("e6502a0011223344")
_CAPS = Capability.LOOP | Capability.PULSE | Capability.FW_UPDATE | Capability.CONFIG
_KINDS = (ChannelKind.LOOP, ChannelKind.LOOP, ChannelKind.PULSE, ChannelKind.PULSE)

# (name, what it shows, seq, ack, flags, message)
VALID: list[tuple[str, str, int, int, int, Message]] = [
    ("connect", "host opens a session, speaks versions 1..1", 1, 0, 0, Connect(1, 1)),
    ("hello_answer", "device answers CONNECT seq 1", 7, 1, FLAG_ANSWER,
     Hello(1, (1, 0, 0), _UID, _CAPS, 1_234_567, 3, 0, HelloFlag(0), _KINDS)),
    ("hello_boot_rolled_back", "unsolicited HELLO after a rollback (needs an ACK)", 1, 0, 0,
     Hello(1, (1, 0, 0), _UID, _CAPS, 52_000, 4, 0, HelloFlag.ROLLED_BACK, _KINDS)),
    ("ping", "", 2, 0, 0, Ping()),
    ("pong", "MCU clock 10.000001 s after boot", 8, 2, FLAG_ANSWER, Pong(10_000_001)),
    ("ack", "answers device request seq 9", 3, 9, FLAG_ANSWER, Ack()),
    ("nak_bad_offset", "refuses a chunk", 9, 4, FLAG_ANSWER,
     Nak(NakCode.BAD_OFFSET, "offset 100 is not a chunk start")),
    ("nak_version", "no common protocol version", 1, 1, FLAG_ANSWER,
     Nak(NakCode.UNSUPPORTED_VERSION, "device speaks 2..3")),
    ("stats_get", "", 5, 0, 0, StatsGet()),
    ("stats", "", 10, 5, FLAG_ANSWER, Stats(1000, 2, 1, 998, 4, 1, 0)),
    ("readings", "a 1 s report of two loops and two meters", 11, 0, 0,
     Readings(61_000_000, 1_000_000, (
         ChannelRecord(0, ChannelKind.LOOP, 2, 517, 412_000),
         ChannelRecord(1, ChannelKind.LOOP, 0, 498, 0),
         ChannelRecord(2, ChannelKind.PULSE, 1, 70_001, 0),
         ChannelRecord(3, ChannelKind.PULSE, 0, 4_294_967_295, 0)))),
    ("readings_retry", "the same report retransmitted", 11, 0, FLAG_RETRY,
     Readings(61_000_000, 1_000_000, (ChannelRecord(0, ChannelKind.LOOP, 2, 517, 412_000),))),
    ("log", "a notice: never answered", 12, 0, 0, Log(30, 61_500_000, "loop 1 open circuit")),
    ("config_get", "", 6, 0, 0, ConfigGet(ConfigKey.REPORT_INTERVAL_MS)),
    ("config_value", "", 13, 6, FLAG_ANSWER, ConfigValue(ConfigKey.REPORT_INTERVAL_MS, 1000)),
    ("config_set", "", 7, 0, 0, ConfigSet(ConfigKey.PULSE_MIN_WIDTH_US, 30_000)),
    ("reboot", "", 8, 0, 0, Reboot()),
    ("fw_begin", "262208-byte image 1.1.0", 20, 0, 0, FwBegin(262_208, (1, 1, 0), _SHA)),
    ("fw_status_resume", "device holds 131072 bytes without a gap", 30, 20, FLAG_ANSWER,
     FwStatus(FwState.RECEIVING, 131_072, 262_208, 1024, (1, 1, 0), _SHA)),
    ("fw_chunk_zeros", "data with zero bytes (COBS replaces them)", 21, 0, 0,
     FwChunk(131_072, bytes([0, 1, 0, 0, 2, 0xFF, 0, 3]))),
    ("fw_chunk_long", "300 bytes: COBS code blocks longer than 254", 22, 0, FLAG_RETRY,
     FwChunk(1024, bytes((i % 255) + 1 for i in range(300)))),
    ("fw_end", "", 23, 0, 0, FwEnd()),
    ("fw_status_verified", "", 31, 23, FLAG_ANSWER,
     FwStatus(FwState.VERIFIED, 262_208, 262_208, 1024, (1, 1, 0), _SHA)),
    ("fw_commit", "", 24, 0, 0, FwCommit()),
    ("fw_abort", "", 25, 0, 0, FwAbort()),
    ("fw_query", "", 26, 0, 0, FwQuery()),
]


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def message_fields(msg: Message) -> dict[str, Any]:
    """The fields of a message as JSON values (bytes as hex, enums and flags as integers)."""
    out = _json_value(msg)
    assert isinstance(out, dict)
    return out


def frame_for(seq: int, ack: int, flags: int, msg: Message) -> Frame:
    return Frame(V, msg.TYPE, seq, msg.encode(), ack=ack, flags=flags)


def _invalid() -> list[dict[str, str]]:
    good = frame_for(2, 0, 0, Ping()).to_bytes()
    flipped = bytearray(frame_for(8, 2, FLAG_ANSWER, Pong(10_000_001)).to_bytes())
    flipped[9] ^= 0x04
    lying = bytearray(good[:-4])
    lying[5] = 3  # says 3 payload bytes, carries none
    lying_body = bytes(lying) + CRC.pack(crc32(bytes(lying)))
    unknown = Frame(V, 0x7E, 3, b"").to_bytes()
    short_pong = Frame(V, Pong.TYPE, 8, b"\x01\x02\x03", ack=2, flags=FLAG_ANSWER).to_bytes()
    return [
        {"name": "crc_mismatch", "error": "crc", "wire": framing.encode(bytes(flipped)).hex(),
         "description": "PONG with one payload bit flipped"},
        {"name": "too_short", "error": "frame", "wire": framing.encode(good[:8]).hex(),
         "description": "8 bytes: shorter than header + CRC"},
        {"name": "length_mismatch", "error": "frame", "wire": framing.encode(lying_body).hex(),
         "description": "valid CRC, length field larger than the payload"},
        {"name": "bad_cobs", "error": "cobs", "wire": "00050102" + "00",
         "description": "a COBS code byte pointing past the delimiter"},
        {"name": "unknown_type", "error": "message", "wire": framing.encode(unknown).hex(),
         "description": "valid frame of type 0x7e: answered NAK UNKNOWN_TYPE"},
        {"name": "short_payload", "error": "message", "wire": framing.encode(short_pong).hex(),
         "description": "PONG with 3 payload bytes instead of 8"},
    ]


def build() -> dict[str, Any]:
    frames = []
    for name, description, seq, ack, flags, msg in VALID:
        frame = frame_for(seq, ack, flags, msg)
        body = frame.to_bytes()
        frames.append({
            "name": name,
            "description": description,
            "wire": framing.encode(body).hex(),
            "body": body.hex(),
            "header": {"version": V, "type": int(msg.TYPE), "type_name": msg.TYPE.name,
                       "flags": flags, "seq": seq, "ack": ack},
            "payload": frame.payload.hex(),
            "message": message_fields(msg),
        })
    return {
        "protocol_version": V,
        "notes": "wire = 00 COBS(body) 00; body = ver type flags seq ack len(2 LE) payload "
                 "crc32(4 LE); CRC-32/ISO-HDLC over header+payload, check value of "
                 "'123456789' = cbf43926",
        "frames": frames,
        "invalid": _invalid(),
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main() -> int:
    PATH.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {len(VALID)} frames to {PATH}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
