"""Frame bodies <-> ``Frame``: header, payload and CRC (PROTOCOL.md, "Frame").

::

    [ver:1] [type:1] [flags:1] [seq:1] [ack:1] [len:2 LE] [payload:len] [crc32:4 LE]

``crc32`` is CRC-32/ISO-HDLC (the zlib/Ethernet CRC) over header and payload. ``ack`` is the
``seq`` of the request this frame answers, valid only when the ANSWER flag is set.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

from firmware_bridge.errors import CrcError, FrameError

HEADER = struct.Struct("<BBBBBH")
CRC = struct.Struct("<I")
HEADER_BYTES: Final = HEADER.size  # 7
CRC_BYTES: Final = CRC.size  # 4
MAX_PAYLOAD_BYTES: Final = 1040  # a 1024-byte flash chunk + its 4-byte offset, with room to spare

FLAG_ANSWER: Final = 0x01  # this frame answers the request whose seq is in ``ack``
FLAG_RETRY: Final = 0x02  # a retransmission of a frame already sent with this seq
KNOWN_FLAGS: Final = FLAG_ANSWER | FLAG_RETRY

def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC, which is zlib's."""
    return zlib.crc32(data)


@dataclass(frozen=True, slots=True)
class Frame:
    version: int
    type: int
    seq: int
    payload: bytes = b""
    ack: int = 0
    flags: int = 0

    @property
    def is_answer(self) -> bool:
        return bool(self.flags & FLAG_ANSWER)

    @property
    def is_retry(self) -> bool:
        return bool(self.flags & FLAG_RETRY)

    def to_bytes(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
        head = HEADER.pack(self.version, self.type, self.flags, self.seq & 0xFF, self.ack & 0xFF,
                           len(self.payload))
        body = head + self.payload
        return body + CRC.pack(crc32(body))

    @classmethod
    def from_bytes(cls, body: bytes) -> Frame:
        """Parse one decoded body; raise FrameError naming what is wrong."""
        if len(body) < HEADER_BYTES + CRC_BYTES:
            raise FrameError(f"frame of {len(body)} bytes is shorter than header + CRC "
                             f"({HEADER_BYTES + CRC_BYTES})")
        (got,) = CRC.unpack_from(body, len(body) - CRC_BYTES)
        want = crc32(body[:-CRC_BYTES])
        if got != want:
            raise CrcError(f"CRC mismatch: frame says {got:#010x}, content gives {want:#010x}")
        version, msg_type, flags, seq, ack, length = HEADER.unpack_from(body)
        if length != len(body) - HEADER_BYTES - CRC_BYTES:
            raise FrameError(f"length field says {length} payload bytes, frame holds "
                             f"{len(body) - HEADER_BYTES - CRC_BYTES}")
        if length > MAX_PAYLOAD_BYTES:
            raise FrameError(f"payload of {length} bytes exceeds {MAX_PAYLOAD_BYTES}")
        # Unknown flag bits are reserved for later versions: ignored, not rejected.
        return cls(version, msg_type, seq, bytes(body[HEADER_BYTES:-CRC_BYTES]), ack,
                   flags & KNOWN_FLAGS)
