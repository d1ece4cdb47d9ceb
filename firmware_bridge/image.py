"""The firmware image format the bridge MCU boots (PROTOCOL.md, "Firmware image").

::

    offset  size  field
    0       4     magic "EAFW"
    4       1     header version (1)
    5       1     flags: bit 0 NO_BOOT (a test image that never starts, see below)
    6       2     reserved, 0
    8       3     firmware version major, minor, patch
    11      1     reserved, 0
    12      4     body size in bytes (LE)
    16      32    sha256 of the body
    48      16    reserved, 0
    64      ...   body

The update protocol moves opaque bytes; the device checks this header at FW_END (magic, size,
body digest) and the bootloader reads it when it starts an image. NO_BOOT exists so that the
rollback path can be exercised: the emulator treats such an image as one that crashes before
it says HELLO, exactly as a broken build would on the real MCU.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from firmware_bridge.errors import UpdateError
from firmware_bridge.messages import Version3

MAGIC = b"EAFW"
HEADER_VERSION = 1
FLAG_NO_BOOT = 0x01
_HEADER = struct.Struct("<4sBBH3BxI32s16x")
HEADER_BYTES = _HEADER.size  # 64


@dataclass(frozen=True, slots=True)
class ImageHeader:
    version: Version3
    body_size: int
    body_sha256: bytes
    flags: int = 0

    @property
    def boots(self) -> bool:
        return not self.flags & FLAG_NO_BOOT


def build_image(version: Version3, body: bytes, *, boots: bool = True) -> bytes:
    """A complete image: header + body."""
    flags = 0 if boots else FLAG_NO_BOOT
    head = _HEADER.pack(MAGIC, HEADER_VERSION, flags, 0, *version, len(body),
                        hashlib.sha256(body).digest())
    return head + body


def parse_header(image: bytes) -> ImageHeader:
    """The header of ``image``; UpdateError names what is wrong. The body digest is not
    checked here (the device does that at FW_END)."""
    if len(image) < HEADER_BYTES:
        raise UpdateError(f"image of {len(image)} bytes is shorter than its {HEADER_BYTES}-byte "
                          "header")
    magic, hver, flags, _, major, minor, patch, size, digest = _HEADER.unpack_from(image)
    if magic != MAGIC:
        raise UpdateError(f"not a firmware image: magic {magic!r}, expected {MAGIC!r}")
    if hver != HEADER_VERSION:
        raise UpdateError(f"image header version {hver} is not supported (expected "
                          f"{HEADER_VERSION})")
    if size != len(image) - HEADER_BYTES:
        raise UpdateError(f"image header says the body is {size} bytes, the image holds "
                          f"{len(image) - HEADER_BYTES}")
    return ImageHeader((major, minor, patch), size, bytes(digest), flags)


def check_image(image: bytes) -> ImageHeader:
    """Header and body digest; what the device does before accepting an image."""
    header = parse_header(image)
    if hashlib.sha256(image[HEADER_BYTES:]).digest() != header.body_sha256:
        raise UpdateError("image body sha256 does not match the digest in its header")
    return header


def version_str(version: Version3) -> str:
    return ".".join(str(v) for v in version)


def parse_version(text: str) -> Version3:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise ValueError(f"{text!r} is not a version MAJOR.MINOR.PATCH (each 0..255)")
    return int(parts[0]), int(parts[1]), int(parts[2])
