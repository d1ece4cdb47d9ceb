"""PMS5003 frames: decoding, resync, fuzz, and the streaming driver against its pty emulator."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.schema import SensorConfig
from agent.readings import Reading
from drivers.base import BuildContext, DeviceNotReady
from drivers.emulated.pms5003 import Pms5003Emulator, background_pm2_5, frame_for
from drivers.registry import build_sensor
from drivers.serial import pms5003
from drivers.serial.pms5003 import FrameParser, PmsFrame, command, decode_frame
from drivers.serial.port import SerialPort
from tests.waiting import running, until

SAMPLE = PmsFrame(5, 9, 12, 4, 8, 11, (1200, 380, 70, 6, 2, 1), reserved=0x9700)


def test_frame_layout_and_checksum() -> None:
    raw = SAMPLE.to_bytes()
    assert len(raw) == 32 and raw[:4] == bytes.fromhex("42 4d 00 1c")
    assert struct.unpack(">H", raw[-2:])[0] == sum(raw[:-2])
    assert decode_frame(raw) == SAMPLE


def test_decode_names_what_is_wrong() -> None:
    raw = bytearray(SAMPLE.to_bytes())
    with pytest.raises(ValueError, match="31 bytes"):
        decode_frame(bytes(raw[:31]))
    raw[-1] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        decode_frame(bytes(raw))


def test_commands_carry_their_sum() -> None:
    # Datasheet: change to active mode is 42 4D E1 00 01 01 71.
    assert command(0xE1, 1) == bytes.fromhex("42 4d e1 00 01 01 71")


def test_ack_frames_are_checked_and_skipped() -> None:
    counts: dict[str, int] = {}
    parser = FrameParser(lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n))
    ack = bytes.fromhex("42 4d 00 04 e1 00 01 74")
    assert parser.feed(ack + SAMPLE.to_bytes()) == [SAMPLE]
    assert counts == {"acks": 1}


def test_garbage_truncation_and_bad_checksums_are_counted_and_dropped() -> None:
    counts: dict[str, int] = {}
    parser = FrameParser(lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n))
    good = SAMPLE.to_bytes()
    bad = good[:-1] + bytes((good[-1] ^ 0x55,))
    stream = b"\x00\x42\x4d\xff" + good[:17] + bad + good + b"BM" + good
    assert parser.feed(stream) == [SAMPLE, SAMPLE]
    assert counts["checksum_errors"] >= 1
    assert counts["garbage_bytes"] > 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=100), max_size=10))
def test_parser_survives_any_bytes_with_a_bounded_buffer(chunks: list[bytes]) -> None:
    parser = FrameParser()
    for chunk in chunks:
        for frame in parser.feed(chunk):
            assert isinstance(frame, PmsFrame)
        assert len(parser.buffer) <= parser.cap


_words = st.integers(0, 0xFFFF)


def _frame(w: list[int]) -> PmsFrame:
    return PmsFrame(w[0], w[1], w[2], w[3], w[4], w[5], (w[6], w[7], w[8], w[9], w[10], w[11]),
                    reserved=w[12])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=70), st.lists(_words, min_size=13, max_size=13)),
             min_size=1, max_size=4),
    st.binary(max_size=40),
    st.integers(1, 40),
)
def test_every_frame_embedded_in_noise_is_found(
    parts: list[tuple[bytes, list[int]]], tail: bytes, chunk: int
) -> None:
    frames = [_frame(w) for _, w in parts]
    stream = b"".join(noise + f.to_bytes() for (noise, _), f in zip(parts, frames, strict=True))
    stream += tail
    parser = FrameParser()
    found: list[PmsFrame] = []
    for i in range(0, len(stream), chunk):
        found += parser.feed(stream[i:i + chunk])
        assert len(parser.buffer) <= parser.cap
    it = iter(found)
    assert all(f in it for f in frames)  # in order, possibly with extra frames from noise


def test_emulated_concentrations_follow_the_day() -> None:
    day = 1_750_032_000.0 - 1_750_032_000.0 % 86400
    assert background_pm2_5(day + 8 * 3600) > 2 * background_pm2_5(day + 3 * 3600)
    f = frame_for(40.0)
    assert f.pm2_5 == 40 and f.pm1_0 < f.pm2_5 < f.pm10
    assert list(f.particles) == sorted(f.particles, reverse=True)
    assert f.pm2_5_cf1 > f.pm2_5  # CF=1 reads higher in dense air




def sensor(ctx: BuildContext) -> pms5003.Pms5003Sensor:
    cfg = SensorConfig(name="air", driver="pms5003", port="emulated", timeout_s=0.3,
                       options={"silence_s": 0.4, "emulator": {"interval_s": 0.02}})
    return build_sensor(cfg, ctx)





async def test_driver_emits_the_frames_values(ctx: BuildContext) -> None:
    s = sensor(ctx)
    emu: Pms5003Emulator = s.emulator
    emu.fixed = SAMPLE
    await s.open()
    out: list[Reading] = []
    async with running(s, out):
        await until(lambda: len(out) >= 18, 2.0)
    first = {r.quantity: (r.value, r.unit) for r in out[:9]}
    assert first == {
        "pm1_0": (4.0, "ug/m3"), "pm2_5": (8.0, "ug/m3"), "pm10": (11.0, "ug/m3"),
        "particles_0_3": (1200.0, "count"), "particles_0_5": (380.0, "count"),
        "particles_1_0": (70.0, "count"), "particles_2_5": (6.0, "count"),
        "particles_5_0": (2.0, "count"), "particles_10": (1.0, "count"),
    }
    # The driver woke the sensor and put it in active mode, which it acknowledged.
    assert emu.commands_seen[:2] == [(0xE4, 1), (0xE1, 1)]
    await until(lambda: s.counters.get("acks", 0) == 2, 1.0)
    await s.close()


@pytest.mark.parametrize(
    ("fault", "counter"),
    [("garbage", "garbage_bytes"), ("corrupt", "checksum_errors"), ("truncate", "checksum_errors")],
)
async def test_frame_faults_are_counted_and_not_emitted(
    ctx: BuildContext, fault: str, counter: str
) -> None:
    s = sensor(ctx)
    emu: Pms5003Emulator = s.emulator
    emu.fixed = SAMPLE
    await s.open()
    out: list[Reading] = []
    async with running(s, out):
        await until(lambda: s.counters.get("frames", 0) >= 2, 2.0)
        sent = emu.frames_sent
        emu.inject(fault, 3)
        await until(lambda: emu.frames_sent >= sent + 6, 2.0)
        await until(lambda: s.counters.get(counter, 0) >= 1, 2.0)
        frames = s.counters["frames"]
        await until(lambda: s.counters["frames"] > frames, 2.0)  # and it carries on
    assert {r.value for r in out if r.quantity == "pm2_5"} == {8.0}
    await s.close()


async def test_silent_sensor_is_not_ready_and_replug_recovers(ctx: BuildContext) -> None:
    s = sensor(ctx)
    emu: Pms5003Emulator = s.emulator
    await s.open()
    out: list[Reading] = []
    emu.faults.silent = True
    with pytest.raises(DeviceNotReady, match=r"pms5003-air: no valid frame for 0.4 s"):
        await asyncio.wait_for(s.run(out.append), 3.0)
    emu.faults.silent = False
    emu.faults.dribble_s = 0.0005  # slow line: frames arrive in single bytes
    async with running(s, out):
        await until(lambda: s.counters.get("frames", 0) >= 1, 2.0)
    emu.faults.dribble_s = 0.0
    emu.unplug()
    with pytest.raises(DeviceNotReady, match="disconnected"):
        await asyncio.wait_for(s.run(out.append), 3.0)
    await s.close()
    with pytest.raises(DeviceNotReady, match="cannot open"):
        await s.open()
    emu.replug()
    await s.open()
    before = s.counters["frames"]
    async with running(s, out):
        await until(lambda: s.counters["frames"] > before, 2.0)
    await s.close()


async def test_passive_mode_answers_read_requests() -> None:
    emu = Pms5003Emulator(interval_s=0.02)
    emu.fixed = SAMPLE
    await emu.start()
    port = SerialPort(emu.path, baudrate=9600)
    try:
        await port.open()
        await port.write(command(0xE1, 0), 1.0)
        await until(lambda: not emu.active, 1.0)
        port.discard_input()
        await port.write(command(0xE2), 1.0)
        parser = FrameParser()
        frames: list[PmsFrame] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while not frames and loop.time() < deadline:
            frames += parser.feed(await port.read(0.1))
        assert frames == [SAMPLE]
    finally:
        await port.close()
        await emu.close()
