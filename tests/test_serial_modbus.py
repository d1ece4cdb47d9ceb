"""Modbus-RTU framing and PZEM register decoding against the manual and pymodbus as oracle."""

from __future__ import annotations

import crcmod.predefined
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.register_message import ReadInputRegistersRequest, ReadInputRegistersResponse

from drivers.serial import modbus
from drivers.serial.pzem004t import Measurement, decode_registers, encode_registers

# PZEM-004T v3.0 manual, "read measurement result" reply example (CRC appended by us).
MANUAL_REPLY_BODY = bytes.fromhex(
    "01 04 14 08 98 03 E8 00 00 08 98 00 00 00 00 00 00 01 F4 00 64 00 00"
)


def test_crc_check_value() -> None:
    assert modbus.crc16(b"123456789") == 0x4B37
    assert modbus.crc16(b"") == 0xFFFF


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_crc_agrees_with_crcmod(data: bytes) -> None:
    assert modbus.crc16(data) == crcmod.predefined.mkPredefinedCrcFun("modbus")(data)


def test_reference_request_frames() -> None:
    assert modbus.read_registers_request(0x01, 0, 10) == bytes.fromhex("01 04 00 00 00 0A 70 0D")
    assert modbus.reset_energy_request(0x01) == bytes.fromhex("01 42 80 11")


def test_manual_reply_decodes_to_the_manual_values() -> None:
    frame = modbus.with_crc(MANUAL_REPLY_BODY)
    parsed = modbus.ReplyParser(0x01, modbus.FC_READ_INPUT, 10).feed(frame)
    assert len(parsed) == 1
    m = decode_registers(parsed[0].registers())
    assert m == Measurement(220.0, 1.0, 220.0, 0.0, 50.0, 1.0, False)


def test_32_bit_values_are_low_word_first_and_alarm_is_ffff() -> None:
    regs = [2301, 0x5678, 0x0001, 0x0010, 0x0002, 0xFFFF, 0x0001, 499, 95, 0xFFFF]
    m = decode_registers(regs)
    assert m.current_a == pytest.approx((0x0001_5678) / 1000)
    assert m.power_w == pytest.approx((0x0002_0010) / 10)
    assert m.energy_wh == 0x0001_FFFF
    assert m.alarm is True
    assert encode_registers(m) == regs


def test_decode_rejects_wrong_register_count() -> None:
    with pytest.raises(ValueError, match="expected 10 registers, got 9"):
        decode_registers([0] * 9)


def test_pymodbus_builds_the_same_request() -> None:
    framer = FramerRTU(DecodePDU(is_server=False))
    pdu = ReadInputRegistersRequest(address=0, count=10, dev_id=1)
    assert framer.buildFrame(pdu) == modbus.read_registers_request(1, 0, 10)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_crc_agrees_with_pymodbus(data: bytes) -> None:
    # pymodbus returns the CRC with its bytes swapped (it sends it big-endian).
    theirs = FramerRTU.compute_CRC(data)
    assert modbus.crc16(data) == ((theirs & 0xFF) << 8) | (theirs >> 8)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 0xF7), st.lists(st.integers(0, 0xFFFF), min_size=10, max_size=10))
def test_pymodbus_decodes_our_reply_frames(address: int, regs: list[int]) -> None:
    body = bytes((address, modbus.FC_READ_INPUT, 20)) + b"".join(r.to_bytes(2, "big") for r in regs)
    frame = modbus.with_crc(body)
    framer = FramerRTU(DecodePDU(is_server=False))
    _, pdu = framer.handleFrame(frame, address, 0)
    assert isinstance(pdu, ReadInputRegistersResponse)
    assert pdu.registers == regs
    ours = modbus.ReplyParser(address, modbus.FC_READ_INPUT, 10).feed(frame)
    assert list(ours[0].registers()) == regs


def test_exception_reply_is_a_frame_with_its_code() -> None:
    raw = modbus.with_crc(bytes((0x01, 0x84, 0x02)))
    (frame,) = modbus.ReplyParser(0x01, modbus.FC_READ_INPUT, 10).feed(raw)
    assert frame.is_exception and frame.exception_code == 0x02
    assert modbus.exception_name(0x02) == "illegal data address"


def test_reply_split_into_single_bytes_is_found() -> None:
    frame = modbus.with_crc(MANUAL_REPLY_BODY)
    parser = modbus.ReplyParser(0x01, modbus.FC_READ_INPUT, 10)
    found = []
    for b in frame:
        found += parser.feed(bytes((b,)))
    assert [f.to_bytes() for f in found] == [frame]


def test_bad_crc_is_counted_and_the_next_frame_still_found() -> None:
    good = modbus.with_crc(MANUAL_REPLY_BODY)
    bad = good[:-1] + bytes((good[-1] ^ 0xFF,))
    counts: dict[str, int] = {}
    parser = modbus.ReplyParser(
        0x01, modbus.FC_READ_INPUT, 10, lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n)
    )
    assert [f.to_bytes() for f in parser.feed(bad + good)] == [good]
    assert counts["crc_errors"] >= 1
    assert counts["garbage_bytes"] >= len(bad)


def test_reply_from_another_address_is_ignored() -> None:
    other = modbus.with_crc(bytes((0x02,)) + MANUAL_REPLY_BODY[1:])
    assert modbus.ReplyParser(0x01, modbus.FC_READ_INPUT, 10).feed(other) == []
    # The general address accepts whichever single meter answers.
    assert len(modbus.ReplyParser(0xF8, modbus.FC_READ_INPUT, 10).feed(other)) == 1


_reply_parsers = st.sampled_from([
    (modbus.FC_READ_INPUT, 10), (modbus.FC_PZEM_RESET_ENERGY, 0), (modbus.FC_WRITE_SINGLE, 0),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8), _reply_parsers)
def test_reply_parser_survives_any_bytes_with_a_bounded_buffer(
    chunks: list[bytes], shape: tuple[int, int]
) -> None:
    parser = modbus.ReplyParser(0x01, shape[0], shape[1])
    for chunk in chunks:
        for frame in parser.feed(chunk):
            assert modbus.crc_ok(frame.to_bytes())
        assert len(parser.buffer) <= parser.cap


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=60),
    st.lists(st.integers(0, 0xFFFF), min_size=10, max_size=10),
    st.binary(max_size=60),
    st.integers(1, 16),
)
def test_reply_embedded_in_noise_is_found(
    before: bytes, regs: list[int], after: bytes, chunk: int
) -> None:
    body = bytes((0x01, 0x04, 20)) + b"".join(r.to_bytes(2, "big") for r in regs)
    frame = modbus.with_crc(body)
    stream = before + frame + after
    parser = modbus.ReplyParser(0x01, modbus.FC_READ_INPUT, 10)
    found = []
    for i in range(0, len(stream), chunk):
        found += parser.feed(stream[i:i + chunk])
        assert len(parser.buffer) <= parser.cap
    assert any(list(f.registers()) == regs for f in found)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.integers(1, 0xF7), st.binary(max_size=60))
def test_request_parser_finds_requests_in_noise(before: bytes, address: int, after: bytes) -> None:
    request = modbus.read_registers_request(address, 0, 10)
    parser = modbus.RequestParser()
    found = parser.feed(before + request + after)
    assert len(parser.buffer) <= parser.cap
    assert any(f.to_bytes() == request for f in found)


def test_request_builders_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="0xf9"):
        modbus.read_registers_request(0xF9, 0, 10)
    with pytest.raises(ValueError, match="count 0"):
        modbus.read_registers_request(1, 0, 0)
