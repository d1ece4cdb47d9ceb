"""Bytes <-> frame bodies: COBS with a 0x00 delimiter, bounded in size.

On the wire every frame is ``00 COBS(body) 00``. COBS removes every zero from the body, so a
zero always means "frame boundary": a receiver that lands in the middle of a frame, or reads
line noise, drops what it has and starts again at the next zero. The leading zero costs one
byte and ends any garbage a receiver may hold before the frame starts; empty frames (two zeros
in a row) are ignored.

This layer knows nothing about headers or CRCs (see ``frames``): it only cuts the byte stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from cobs import cobs

log = logging.getLogger(__name__)

DELIMITER = b"\x00"
# Header 7 + payload 1040 + CRC 4 (PROTOCOL.md, "Frame"): the largest decoded body.
MAX_BODY_BYTES = 7 + 1040 + 4
# COBS adds one code byte per 254 data bytes, plus one.
MAX_ENCODED_BYTES = MAX_BODY_BYTES + MAX_BODY_BYTES // 254 + 1


def encode(body: bytes) -> bytes:
    """The wire bytes of one frame body, delimiters included."""
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    return DELIMITER + bytes(cobs.encode(body)) + DELIMITER


class Deframer:
    """Cuts a byte stream into COBS-decoded bodies; never raises on bad input.

    ``counters`` tells what was dropped: ``cobs_errors`` (a chunk between delimiters that is not
    valid COBS) and ``oversize`` (more than ``MAX_ENCODED_BYTES`` without a delimiter, i.e. noise
    or a lost delimiter; everything up to the next zero is dropped).
    """

    def __init__(self, max_encoded: int = MAX_ENCODED_BYTES) -> None:
        self.max_encoded = max_encoded
        self._buf = bytearray()
        self._discarding = False
        self.counters: dict[str, int] = {"cobs_errors": 0, "oversize": 0, "bodies": 0}

    def reset(self) -> None:
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield each complete body found in ``data`` (plus what earlier calls left over)."""
        start = 0
        while True:
            end = data.find(0, start)
            if end < 0:
                self._append(data[start:])
                return
            self._append(data[start:end])
            body = self._take()
            start = end + 1
            if body is not None:
                yield body

    def _append(self, chunk: bytes) -> None:
        if self._discarding or not chunk:
            return
        if len(self._buf) + len(chunk) > self.max_encoded:
            self.counters["oversize"] += 1
            log.debug("dropping %d bytes without a delimiter", len(self._buf) + len(chunk))
            self._buf.clear()
            self._discarding = True
            return
        self._buf += chunk

    def _take(self) -> bytes | None:
        encoded = bytes(self._buf)
        self._buf.clear()
        if self._discarding:
            self._discarding = False
            return None
        if not encoded:
            return None
        try:
            body = cobs.decode(encoded)
        except cobs.DecodeError as exc:
            self.counters["cobs_errors"] += 1
            log.debug("dropping %d bytes that are not COBS: %s", len(encoded), exc)
            return None
        self.counters["bodies"] += 1
        return bytes(body)
