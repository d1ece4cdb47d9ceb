"""Every serial and bridge frame parser against hostile bytes: 100,000 cases each.

Each hypothesis example draws one hostile input (a valid frame, hostile JSON, bytes that are not
UTF-8) and ``tests.hostile.mutations`` derives 50 cases from it (truncations, flips, splices),
so 2,000 examples make 100,000 cases at a few seconds per parser. Zero exceptions outside the
project's error types and zero junk values accepted; the table is printed at the end.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import DriverError
from drivers.modbus.tcp import _parse as modbus_tcp_parse
from drivers.serial import modbus, pms5003
from drivers.serial.ops243_reports import PLAUSIBLE_MPS, LineParser, Reply, SpeedReport
from drivers.serial.pzem004t import INPUT_REGISTERS, Measurement, decode_registers, encode_registers
from firmware_bridge import framing
from firmware_bridge.errors import FrameError, MessageError
from firmware_bridge.frames import CRC, HEADER, Frame, crc32
from firmware_bridge.messages import BY_TYPE, decode_message
from tests import hostile

pytestmark = [pytest.mark.slow]

CASES = 100_000
PER_EXAMPLE = 50
EXAMPLES = CASES // PER_EXAMPLE
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
OPS_KEYS = ("speed", "magnitude", "unit", "direction", "time", "Speed", "units")


@pytest.fixture(scope="module", autouse=True)
def summary_table(request: pytest.FixtureRequest) -> Iterator[None]:
    with hostile.printed(request, "fuzz summary: serial and bridge frame parsers"):
        yield


def finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def cases(seed: int, base: bytes) -> Iterator[bytes]:
    return hostile.mutations(base, random.Random(seed), PER_EXAMPLE)


# -- OPS243 ------------------------------------------------------------------------------------

ops_valid = st.sampled_from([
    b'{"speed":"-1.23"}', b'{"unit":"mps","magnitude":"68","speed":-1.23}',
    b'{"time":"812.3","Speed":[2.1,-0.9],"Magnitude":[60,31]}', b'"mps",-1.23', b"1.23",
    b'{"speed":"1.2","direction":"inbound"}', b'{"Units":"m-per-sec"}'])


def ops_item_ok(item: Any) -> bool:
    if isinstance(item, SpeedReport):
        return (finite(*item.speeds_mps, *item.magnitudes)
                and all(abs(v) <= PLAUSIBLE_MPS for v in item.speeds_mps)
                and (item.device_time_s is None or finite(item.device_time_s)))
    if isinstance(item, Reply):
        return all(not isinstance(v, float) or math.isfinite(v) for v in item.fields.values())
    return False


@FUZZ
@given(st.integers(0, 2**32), st.one_of(ops_valid, hostile.hostile_bytes(OPS_KEYS)))
def test_ops243_lines(seed: int, base: bytes) -> None:
    t = hostile.tally("OPS243 report lines")
    for case in cases(seed, base):
        parser = LineParser()
        t.run(lambda c=case, p=parser: p.feed(c + b"\n"), (DriverError,),
              check=lambda items: all(ops_item_ok(i) for i in items),
              rejected=lambda items: not items)
    t.assert_clean()


# -- PZEM-004T / Modbus RTU --------------------------------------------------------------------

ADDRESS = 0x01


def _reply() -> bytes:
    m = Measurement(231.4, 1.25, 289.2, 123456.0, 50.0, 0.98, False)
    regs = encode_registers(m)
    body = bytes((ADDRESS, modbus.FC_READ_INPUT, 2 * len(regs)))
    return modbus.with_crc(body + b"".join(r.to_bytes(2, "big") for r in regs))


modbus_base = st.one_of(
    st.just(_reply()),
    st.just(modbus.with_crc(bytes((ADDRESS, modbus.FC_READ_INPUT | 0x80, 0x04)))),
    st.just(modbus.read_registers_request(ADDRESS, 0, INPUT_REGISTERS)),
    st.binary(max_size=64), hostile.non_utf8)


def modbus_frames_ok(frames: list[modbus.Frame]) -> bool:
    for f in frames:
        if not modbus.crc_ok(f.to_bytes()) or f.address != ADDRESS:
            return False
        if not f.is_exception:
            m = decode_registers(f.registers())
            if not finite(m.voltage_v, m.current_a, m.power_w, m.energy_wh, m.frequency_hz,
                          m.power_factor):
                return False
    return True


@FUZZ
@given(st.integers(0, 2**32), modbus_base)
def test_modbus_rtu_replies(seed: int, base: bytes) -> None:
    t = hostile.tally("PZEM-004T Modbus RTU replies")
    for case in cases(seed, base):
        def parse(c: bytes = case) -> list[modbus.Frame]:
            parser = modbus.ReplyParser(ADDRESS, modbus.FC_READ_INPUT, INPUT_REGISTERS)
            frames = parser.feed(c)
            if not frames:  # what the driver does with bytes that hold no reply
                modbus.describe_bad_reply(c, ADDRESS, modbus.FC_READ_INPUT,
                                          parser.normal_length)
            return frames

        t.run(parse, (DriverError,), check=modbus_frames_ok, rejected=lambda fs: not fs)
    t.assert_clean()


@FUZZ
@given(st.integers(0, 2**32), modbus_base)
def test_modbus_rtu_requests(seed: int, base: bytes) -> None:
    t = hostile.tally("Modbus RTU requests (emulator side)")
    for case in cases(seed, base):
        t.run(lambda c=case: modbus.RequestParser().feed(c), (DriverError,),
              check=lambda fs: all(modbus.crc_ok(f.to_bytes()) for f in fs),
              rejected=lambda fs: not fs)
    t.assert_clean()


modbus_tcp_base = st.one_of(
    st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20).map(
        lambda regs: bytes((ADDRESS, modbus.FC_READ_HOLDING, 2 * len(regs)))
        + b"".join(r.to_bytes(2, "big") for r in regs)),
    st.binary(min_size=1, max_size=4).map(
        lambda b: bytes((ADDRESS, modbus.FC_READ_COILS, len(b))) + b),
    st.just(bytes((ADDRESS, modbus.FC_READ_HOLDING | 0x80, 0x02))),
    st.binary(max_size=64))


@FUZZ
@given(st.integers(0, 2**32), modbus_tcp_base, st.integers(1, 20), st.booleans())
def test_modbus_tcp_reply_pdus(seed: int, base: bytes, count: int, bits: bool) -> None:
    t = hostile.tally("Modbus TCP reply PDUs")
    fc = modbus.FC_READ_COILS if bits else modbus.FC_READ_HOLDING
    for case in cases(seed, base):
        t.run(lambda c=case: modbus_tcp_parse(c, ADDRESS, fc, count, bits), (DriverError,),
              check=lambda vals: len(vals) == count
              and all(0 <= v <= (1 if bits else 0xFFFF) for v in vals))
    t.assert_clean()


# -- PMS5003 -----------------------------------------------------------------------------------

pms_base = st.one_of(
    st.builds(lambda v: pms5003.PmsFrame(*v[:6], tuple(v[6:12]), reserved=v[12]).to_bytes(),
              st.lists(st.integers(0, 0xFFFF), min_size=13, max_size=13)),
    st.just(pms5003.command(0xE1, 0)), st.binary(max_size=80), hostile.non_utf8)


@FUZZ
@given(st.integers(0, 2**32), pms_base)
def test_pms5003_frames(seed: int, base: bytes) -> None:
    t = hostile.tally("PMS5003 frames")
    for case in cases(seed, base):
        t.run(lambda c=case: pms5003.FrameParser().feed(c), (DriverError,),
              check=lambda fs: all(pms5003.decode_frame(f.to_bytes()) == f for f in fs),
              rejected=lambda fs: not fs)
    t.assert_clean()


# -- firmware bridge: COBS, frames, messages --------------------------------------------------

def _frame_body(version: int, msg_type: int, flags: int, seq: int, length_delta: int,
                payload: bytes) -> bytes:
    """A body with a correct CRC over whatever header it has (so the checks past the CRC run)."""
    head = HEADER.pack(version, msg_type, flags, seq, 0,
                       max(0, min(0xFFFF, len(payload) + length_delta)))
    return head + payload + CRC.pack(crc32(head + payload))


bridge_base = st.one_of(
    st.builds(_frame_body, st.integers(0, 255), st.sampled_from(sorted(BY_TYPE)),
              st.integers(0, 255), st.integers(0, 255), st.sampled_from([0, 0, 0, -1, 1, 900]),
              st.binary(max_size=80)).map(framing.encode),
    st.binary(max_size=120), hostile.non_utf8)


def bridge_pipeline(data: bytes) -> list[Any]:
    """Bytes -> bodies -> frames -> messages, as the link does it (errors per frame)."""
    out: list[Any] = []
    for body in framing.Deframer().feed(data + b"\x00"):
        try:
            frame = Frame.from_bytes(body)
            out.append(decode_message(frame.type, frame.payload))
        except (FrameError, MessageError):
            out.append(None)
    return out


@FUZZ
@given(st.integers(0, 2**32), bridge_base)
def test_firmware_bridge_cobs_frames_messages(seed: int, base: bytes) -> None:
    t = hostile.tally("firmware bridge COBS -> frames -> msgs")
    for case in cases(seed, base):
        t.run(lambda c=case: bridge_pipeline(c), (DriverError,),
              check=lambda ms: all(m is None or m.encode() is not None for m in ms),
              rejected=lambda ms: not any(m is not None for m in ms))
    t.assert_clean()


@FUZZ
@given(st.integers(0, 2**32), st.sampled_from([*sorted(BY_TYPE), 0, 0xFF]),
       st.binary(max_size=120))
def test_firmware_bridge_message_payloads(seed: int, msg_type: int, base: bytes) -> None:
    t = hostile.tally("firmware bridge message payloads")
    for case in cases(seed, base):
        t.run(lambda c=case: decode_message(msg_type, c), (MessageError,),
              check=lambda m: type(m).decode(m.encode()) == m)
    t.assert_clean()


def test_the_tally_sees_a_foreign_exception_and_junk() -> None:
    t = hostile.Tally("self-check")

    def boom() -> None:
        raise struct.error("unpack requires a buffer")

    t.run(boom, (DriverError,))
    t.run(lambda: [float("nan")], (DriverError,), check=lambda r: finite(*r))
    assert (t.cases, t.foreign, t.junk) == (2, 1, 1)
    with pytest.raises(AssertionError):
        t.assert_clean()


@pytest.mark.parametrize("target", [
    "OPS243 report lines", "PZEM-004T Modbus RTU replies", "Modbus RTU requests (emulator side)",
    "Modbus TCP reply PDUs",
    "PMS5003 frames", "firmware bridge COBS -> frames -> msgs",
    "firmware bridge message payloads"])
def test_parsers_were_clean(target: str) -> None:
    """After the runs above (same module, file order): at least 100,000 cases each, clean."""
    t = hostile.TABLE.get(target)
    if t is None:
        pytest.skip(f"{target} did not run in this session (selected out)")
    assert t.cases >= CASES
    t.assert_clean()
