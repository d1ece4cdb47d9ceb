"""Bytes -> frames -> messages: known-answer vectors, independent oracles and fuzzing."""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from typing import Any

import crcmod.predefined
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge import framing, testvectors
from firmware_bridge.errors import CrcError, FrameError, MessageError
from firmware_bridge.frames import FLAG_ANSWER, FLAG_RETRY, MAX_PAYLOAD_BYTES, Frame, crc32
from firmware_bridge.link import Link
from firmware_bridge.messages import (
    BY_TYPE,
    ChannelKind,
    ChannelRecord,
    Log,
    MsgType,
    Readings,
    decode_message,
)

VECTORS: dict[str, Any] = json.loads(testvectors.PATH.read_text(encoding="utf-8"))


def reference_cobs_decode(data: bytes) -> bytes:
    """COBS decoding written from the algorithm's description, as an oracle."""
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        assert code != 0, "zero inside a COBS block"
        block = data[i + 1:i + code]
        assert len(block) == code - 1, "block runs past the end"
        out += block
        i += code
        if code < 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


def test_crc_is_crc32_iso_hdlc() -> None:
    assert crc32(b"123456789") == 0xCBF43926
    assert crc32(b"123456789") == zlib.crc32(b"123456789")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_crc32_agrees_with_crcmod(data: bytes) -> None:
    assert crc32(data) == crcmod.predefined.mkPredefinedCrcFun("crc-32")(data)


def test_stored_vectors_are_current() -> None:
    assert testvectors.PATH.read_text(encoding="utf-8") == testvectors.render()


@pytest.mark.parametrize("vector", VECTORS["frames"], ids=lambda v: v["name"])
def test_vector_encodes_and_decodes(vector: dict[str, Any]) -> None:
    wire = bytes.fromhex(vector["wire"])
    body = bytes.fromhex(vector["body"])
    head = vector["header"]
    # Independent oracles: delimiters, COBS, header layout, zlib's CRC-32.
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    assert reference_cobs_decode(wire[1:-1]) == body
    version, msg_type, flags, seq, ack, length = struct.unpack_from("<BBBBBH", body)
    assert (version, msg_type, flags, seq, ack) == (
        head["version"], head["type"], head["flags"], head["seq"], head["ack"])
    assert length == len(body) - 11 == len(bytes.fromhex(vector["payload"]))
    assert struct.unpack("<I", body[-4:])[0] == zlib.crc32(body[:-4])
    # Decoder.
    bodies = list(framing.Deframer().feed(wire))
    assert bodies == [body]
    frame = Frame.from_bytes(body)
    assert frame.payload.hex() == vector["payload"]
    msg = decode_message(frame.type, frame.payload)
    assert msg.TYPE.name == head["type_name"]
    assert testvectors.message_fields(msg) == vector["message"]
    # Encoder.
    again = Frame(version, msg.TYPE, seq, msg.encode(), ack=ack, flags=flags)
    assert framing.encode(again.to_bytes()) == wire


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_is_refused(vector: dict[str, Any]) -> None:
    deframer = framing.Deframer()
    bodies = list(deframer.feed(bytes.fromhex(vector["wire"])))
    if vector["error"] == "cobs":
        assert bodies == [] and deframer.counters["cobs_errors"] == 1
        return
    (body,) = bodies
    if vector["error"] == "crc":
        with pytest.raises(CrcError, match="CRC mismatch"):
            Frame.from_bytes(body)
    elif vector["error"] == "frame":
        with pytest.raises(FrameError) as info:
            Frame.from_bytes(body)
        assert not isinstance(info.value, CrcError)
    else:
        frame = Frame.from_bytes(body)
        with pytest.raises(MessageError):
            decode_message(frame.type, frame.payload)


def test_frame_errors_name_the_problem() -> None:
    body = Frame(1, MsgType.PING, 1).to_bytes()
    with pytest.raises(FrameError, match="shorter than header"):
        Frame.from_bytes(body[:5])
    with pytest.raises(ValueError, match="exceeds 1040"):
        Frame(1, MsgType.FW_CHUNK, 1, bytes(MAX_PAYLOAD_BYTES + 1)).to_bytes()
    with pytest.raises(MessageError, match="READINGS with 2 records is 27 bytes, expected 41"):
        Readings.decode(struct.pack("<QIB", 1, 2, 2) + bytes(14))
    with pytest.raises(MessageError, match="unknown message type 0x7f"):
        decode_message(0x7F, b"")
    with pytest.raises(MessageError, match="unknown channel kind 9"):
        Readings.decode(struct.pack("<QIB", 1, 2, 1) + struct.pack("<BBIII", 0, 9, 0, 0, 0))


def test_deframer_drops_oversize_runs_and_resyncs() -> None:
    d = framing.Deframer()
    good = framing.encode(Frame(1, MsgType.PING, 5).to_bytes())
    out = list(d.feed(b"\x55" * (framing.MAX_ENCODED_BYTES + 10)))
    out += list(d.feed(b"\x55" * 100 + good))
    assert [Frame.from_bytes(b).seq for b in out] == [5]
    assert d.counters["oversize"] == 1


def test_largest_frame_fits_the_deframer() -> None:
    frame = Frame(1, MsgType.FW_CHUNK, 1, bytes(range(256)) * 4 + bytes(16))
    wire = framing.encode(frame.to_bytes())
    assert len(wire) - 2 == framing.MAX_ENCODED_BYTES
    assert list(framing.Deframer().feed(wire)) == [frame.to_bytes()]


frames_st = st.builds(
    Frame,
    version=st.just(1),
    type=st.sampled_from(sorted(BY_TYPE)),
    seq=st.integers(0, 255),
    payload=st.binary(max_size=MAX_PAYLOAD_BYTES),
    ack=st.integers(0, 255),
    flags=st.sampled_from([0, FLAG_ANSWER, FLAG_RETRY, FLAG_ANSWER | FLAG_RETRY]),
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    out, i = [], 0
    for c in cuts:
        out.append(data[i:i + c])
        i += c
    out.append(data[i:])
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noise=st.binary(max_size=3000), cuts=st.lists(st.integers(1, 200), max_size=30))
def test_fuzz_noise_never_raises(noise: bytes, cuts: list[int]) -> None:
    d = framing.Deframer()
    for piece in _chunks(noise, cuts):
        for body in d.feed(piece):
            try:
                frame = Frame.from_bytes(body)
                decode_message(frame.type, frame.payload)
            except (FrameError, MessageError):
                pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(frames_st, min_size=1, max_size=6),
    noise=st.lists(st.binary(max_size=400), min_size=7, max_size=7),
    cuts=st.lists(st.integers(1, 300), max_size=40),
)
def test_fuzz_frames_inside_noise_are_recovered(frames: list[Frame], noise: list[bytes],
                                                cuts: list[int]) -> None:
    stream = b"".join(noise[i] + framing.encode(f.to_bytes()) for i, f in enumerate(frames))
    stream += noise[-1]
    d = framing.Deframer()
    got: list[Frame] = []
    for piece in _chunks(stream, cuts):
        for body in d.feed(piece):
            with contextlib.suppress(FrameError):
                got.append(Frame.from_bytes(body))
    # Every sent frame comes out, in order; noise may add nothing that passes the CRC but the
    # check below tolerates it (a 2**-32 chance).
    it = iter(got)
    assert all(any(g == f for g in it) for f in frames)


class _NullTransport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


@settings(max_examples=100, deadline=None)
@given(noise=st.binary(max_size=2000), cuts=st.lists(st.integers(1, 100), max_size=20),
       text=st.text(max_size=50))
def test_fuzz_link_callback_survives_noise_and_delivers_notices(noise: bytes, cuts: list[int],
                                                                text: str) -> None:
    notices: list[object] = []
    link = Link("fuzz", on_notice=notices.append)
    link.connection_made(_NullTransport())  # type: ignore[arg-type]
    log_msg = Log(20, 5, text)
    wire = framing.encode(Frame(1, Log.TYPE, 9, log_msg.encode()).to_bytes())
    for piece in _chunks(noise + wire, cuts):
        link.data_received(piece)  # must never raise
    assert notices[-1] == Log(20, 5, text.encode()[:200].decode("utf-8", errors="replace"))
    assert link.pending == 0


@given(msg_type=st.integers(0, 255), payload=st.binary(max_size=1100))
def test_fuzz_message_decoder_raises_only_message_error(msg_type: int, payload: bytes) -> None:
    try:
        msg = decode_message(msg_type, payload)
    except MessageError:
        return
    assert msg_type == msg.TYPE
    # What decodes re-encodes into something that decodes again (text may be normalised).
    assert msg_type == decode_message(msg_type, msg.encode()).TYPE


def test_readings_round_trip_keeps_wrapping_totals() -> None:
    r = Readings(2**40, 1_000_000, (ChannelRecord(3, ChannelKind.PULSE, 7, 2**32 - 1, 0),))
    assert decode_message(MsgType.READINGS, r.encode()) == r
