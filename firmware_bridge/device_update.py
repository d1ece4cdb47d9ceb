"""The device's side of FW_BEGIN .. FW_END: an erased slot that fills up chunk by chunk.

Chunks may arrive in any order (the host keeps a window of them in flight); the device records
which ones it holds and reports the gap-free prefix, which is where an interrupted transfer
resumes. The record lives in flash with the data, so it survives a reboot; only what lies after
the first gap is forgotten then (the RAM bitmap is gone, a scan of flash finds the prefix).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from firmware_bridge.errors import UpdateError
from firmware_bridge.image import check_image
from firmware_bridge.messages import (
    FwBegin,
    FwChunk,
    FwState,
    FwStatus,
    Message,
    Nak,
    NakCode,
    Version3,
)


@dataclass
class PendingImage:
    size: int
    version: Version3
    sha256: bytes
    chunk: int
    data: bytearray = field(default_factory=bytearray)
    have: bytearray = field(default_factory=bytearray)  # one flag per chunk
    state: FwState = FwState.RECEIVING
    _prefix: int = 0  # index of the first chunk not received

    def prefix_bytes(self) -> int:
        while self._prefix < len(self.have) and self.have[self._prefix]:
            self._prefix += 1
        return min(self.size, self._prefix * self.chunk)

    def forget_after_prefix(self) -> None:
        keep = self.prefix_bytes() // self.chunk
        for i in range(keep, len(self.have)):
            self.have[i] = 0


class UpdateReceiver:
    def __init__(self, slot_bytes: int, chunk_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.chunk_bytes = chunk_bytes
        self.pending: PendingImage | None = None
        self.flash_fault_at: int | None = None  # a byte offset that flash programs wrong
        # What the host sent of images, refused or not (tests assert a refused image never came).
        self.begins = 0
        self.chunk_bytes_received = 0

    def power_cycle(self) -> None:
        if self.pending is not None:
            self.pending.forget_after_prefix()

    def abort(self) -> None:
        self.pending = None

    def status(self) -> FwStatus:
        u = self.pending
        if u is None:
            return FwStatus(FwState.IDLE, 0, 0, self.chunk_bytes, (0, 0, 0), bytes(32))
        return FwStatus(u.state, u.prefix_bytes(), u.size, u.chunk, u.version, u.sha256)

    def begin(self, msg: FwBegin) -> Message:
        self.begins += 1
        if msg.size > self.slot_bytes:
            return Nak(NakCode.TOO_LARGE,
                       f"{msg.size} bytes do not fit a {self.slot_bytes}-byte slot")
        if msg.size == 0:
            return Nak(NakCode.INVALID_VALUE, "image size is 0")
        u = self.pending
        if u is not None and (u.size, u.version, u.sha256) == (msg.size, msg.version, msg.sha256):
            if u.state == FwState.VERIFIED:
                u.state = FwState.RECEIVING
            return self.status()  # the same image: resume where the flash says
        n = -(-msg.size // self.chunk_bytes)
        # Erasing the slot: erased NOR flash reads 0xFF.
        self.pending = PendingImage(msg.size, msg.version, msg.sha256, self.chunk_bytes,
                                    bytearray(b"\xff" * msg.size), bytearray(n))
        return self.status()

    def chunk(self, msg: FwChunk) -> Message:
        self.chunk_bytes_received += len(msg.data)
        u = self.pending
        if u is None or u.state != FwState.RECEIVING:
            return Nak(NakCode.BAD_STATE, "no update in progress: send FW_BEGIN")
        if msg.offset % u.chunk or msg.offset >= u.size:
            return Nak(NakCode.BAD_OFFSET, f"offset {msg.offset} is not a chunk start "
                       f"(chunk {u.chunk}, size {u.size})")
        want = min(u.chunk, u.size - msg.offset)
        if len(msg.data) != want:
            return Nak(NakCode.INVALID_VALUE,
                       f"chunk at {msg.offset} is {len(msg.data)} bytes, expected {want}")
        index = msg.offset // u.chunk
        if u.have[index]:
            if u.data[msg.offset:msg.offset + want] != msg.data:
                return Nak(NakCode.BAD_STATE, f"chunk at {msg.offset} already written "
                           "with other data: send FW_ABORT and start again")
            return self.status()
        data = bytearray(msg.data)
        fault = self.flash_fault_at
        if fault is not None and msg.offset <= fault < msg.offset + want:
            data[fault - msg.offset] ^= 0x01
        u.data[msg.offset:msg.offset + want] = data
        u.have[index] = 1
        return self.status()

    def end(self) -> Message:
        u = self.pending
        if u is None:
            return Nak(NakCode.BAD_STATE, "no update in progress")
        held = u.prefix_bytes()
        if held < u.size:
            return Nak(NakCode.BAD_STATE, f"image incomplete: {held} of {u.size} bytes")
        digest = hashlib.sha256(u.data).digest()
        if digest != u.sha256:
            return Nak(NakCode.VERIFY_FAILED, f"received image sha256 {digest.hex()[:16]}... "
                       f"differs from FW_BEGIN {u.sha256.hex()[:16]}...")
        try:
            check_image(bytes(u.data))
        except UpdateError as exc:
            return Nak(NakCode.VERIFY_FAILED, str(exc))
        u.state = FwState.VERIFIED
        return self.status()

    def take_verified(self) -> bytes | Nak:
        """The verified image for FW_COMMIT (the update state is done with it)."""
        u = self.pending
        if u is None or u.state != FwState.VERIFIED:
            return Nak(NakCode.BAD_STATE, "nothing verified to commit: send FW_END first")
        self.pending = None
        return bytes(u.data)
