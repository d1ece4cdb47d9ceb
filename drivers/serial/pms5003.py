"""Plantower PMS5003 particulate matter sensor (UART 9600 8N1), active (streaming) mode.

Data frame (PMS5003 data manual v2.3, appendix I), big-endian u16 words::

    [0x42 0x4D] [length = 28] [13 data words] [checksum = sum of the 30 preceding bytes]
    words 1-3  PM1.0 / PM2.5 / PM10, CF=1 (factory calibration particle)      ug/m3
    words 4-6  PM1.0 / PM2.5 / PM10, atmospheric environment                  ug/m3
    words 7-12 particles > 0.3 / 0.5 / 1.0 / 2.5 / 5.0 / 10 um per 0.1 L of air
    word 13    reserved

Commands are ``42 4D cmd data_hi data_lo`` + the u16 sum of those five bytes; the sensor
acknowledges some with a short frame of length 4, which is checked and skipped.

In active mode the sensor sends a frame every 200..800 ms, or every 2.3 s once readings are
stable. If no valid frame arrives for ``silence_s`` (default the larger of ``timeout_s`` and
two stable intervals) the sensor is reported not ready.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.clock import Clock
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady, Emit, Sensor
from drivers.serial.port import SerialPort, option

log = logging.getLogger(__name__)

BAUDRATE = 9600
HEADER = b"\x42\x4d"
DATA_LENGTH = 28
FRAME_BYTES = 4 + DATA_LENGTH
ACK_LENGTH = 4
ACK_BYTES = 4 + ACK_LENGTH
STABLE_INTERVAL_S = 2.3  # datasheet: active mode, stable readings
PARSER_CAP = 2 * FRAME_BYTES

CMD_READ_PASSIVE = 0xE2
CMD_SET_MODE = 0xE1  # data 0 = passive, 1 = active
CMD_SLEEP = 0xE4  # data 0 = sleep, 1 = wake

Count = Callable[[str, int], None]

PARTICLE_SIZES = ("0_3", "0_5", "1_0", "2_5", "5_0", "10")


@dataclass(frozen=True, slots=True)
class PmsFrame:
    pm1_0_cf1: int
    pm2_5_cf1: int
    pm10_cf1: int
    pm1_0: int
    pm2_5: int
    pm10: int
    particles: tuple[int, int, int, int, int, int]  # per 0.1 L, sizes PARTICLE_SIZES
    reserved: int = 0

    def to_bytes(self) -> bytes:
        body = HEADER + struct.pack(
            ">H13H", DATA_LENGTH, self.pm1_0_cf1, self.pm2_5_cf1, self.pm10_cf1,
            self.pm1_0, self.pm2_5, self.pm10, *self.particles, self.reserved,
        )
        return body + struct.pack(">H", sum(body) & 0xFFFF)


def decode_frame(frame: bytes) -> PmsFrame:
    """One 32-byte data frame; ValueError names what is wrong."""
    if len(frame) != FRAME_BYTES:
        raise ValueError(f"frame is {len(frame)} bytes, expected {FRAME_BYTES}")
    if frame[:2] != HEADER:
        raise ValueError(f"frame starts {frame[:2].hex(' ')}, expected 42 4d")
    length, *words, check = struct.unpack(">H13HH", frame[2:])
    w: list[int] = words
    if length != DATA_LENGTH:
        raise ValueError(f"length field {length}, expected {DATA_LENGTH}")
    if sum(frame[:-2]) & 0xFFFF != check:
        raise ValueError(f"checksum {check:#06x}, computed {sum(frame[:-2]) & 0xFFFF:#06x}")
    return PmsFrame(w[0], w[1], w[2], w[3], w[4], w[5],
                    (w[6], w[7], w[8], w[9], w[10], w[11]), reserved=w[12])


def command(cmd: int, data: int = 0) -> bytes:
    body = HEADER + bytes((cmd, (data >> 8) & 0xFF, data & 0xFF))
    return body + struct.pack(">H", sum(body) & 0xFFFF)


def _noop_count(key: str, n: int) -> None:
    pass


class FrameParser:
    """Finds frames in a byte stream; bad candidates cost one byte, so it resyncs at once."""

    cap = PARSER_CAP

    def __init__(self, count: Count | None = None) -> None:
        self.buffer = bytearray()
        self._count = count or _noop_count

    def feed(self, data: bytes) -> list[PmsFrame]:
        out: list[PmsFrame] = []
        buf = self.buffer
        buf += data
        skipped = 0
        while True:
            start = buf.find(HEADER)
            if start < 0:
                keep = 1 if buf[-1:] == HEADER[:1] else 0
                skipped += len(buf) - keep
                del buf[: len(buf) - keep]
                break
            if start:
                skipped += start
                del buf[:start]
            if len(buf) < 4:
                break
            length = int.from_bytes(buf[2:4], "big")
            if length == DATA_LENGTH:
                n = FRAME_BYTES
            elif length == ACK_LENGTH:
                n = ACK_BYTES
            else:
                self._count("bad_length", 1)
                skipped += 1
                del buf[0]
                continue
            if len(buf) < n:
                break
            raw = bytes(buf[:n])
            if sum(raw[:-2]) & 0xFFFF != int.from_bytes(raw[-2:], "big"):
                self._count("checksum_errors", 1)
                log.debug("pms5003: checksum mismatch in %s", raw.hex(" "))
                skipped += 1
                del buf[0]
                continue
            del buf[:n]
            if n == FRAME_BYTES:
                out.append(decode_frame(raw))
            else:
                self._count("acks", 1)
        if skipped:
            self._count("garbage_bytes", skipped)
        return out


class Pms5003Sensor(Sensor):
    def __init__(
        self,
        name: str,
        clock: Clock,
        port: SerialPort,
        *,
        silence_s: float,
        timeout_s: float,
    ) -> None:
        super().__init__(name, clock)
        self.port = port
        self.silence_s = silence_s
        self.timeout_s = timeout_s
        self.parser = FrameParser(self.count)

    async def open(self) -> None:
        if self.emulator is not None:
            await self.emulator.start()
        await self.port.open()
        self.parser = FrameParser(self.count)
        # The sensor may have been left in passive mode or asleep by someone else.
        await self.port.write(command(CMD_SLEEP, 1), self.timeout_s)
        await self.port.write(command(CMD_SET_MODE, 1), self.timeout_s)

    async def close(self) -> None:
        await self.port.close()

    def readings_of(self, f: PmsFrame) -> list[Any]:
        out = [
            self.reading("pm1_0", float(f.pm1_0), "ug/m3"),
            self.reading("pm2_5", float(f.pm2_5), "ug/m3"),
            self.reading("pm10", float(f.pm10), "ug/m3"),
        ]
        out += [
            self.reading(f"particles_{size}", float(n), "count")
            for size, n in zip(PARTICLE_SIZES, f.particles, strict=True)
        ]
        return out

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop().time
        last_frame = loop()
        while True:
            remaining = last_frame + self.silence_s - loop()
            if remaining <= 0:
                raise DeviceNotReady(
                    f"no valid frame for {self.silence_s:g} s", where=self.port.where
                )
            data = await self.port.read(remaining)
            frames = self.parser.feed(data) if data else []
            for frame in frames:
                self.count("frames")
                for r in self.readings_of(frame):
                    emit(r)
            if frames:
                last_frame = loop()


def build(cfg: Any, ctx: BuildContext) -> Pms5003Sensor:
    where = f"sensor {cfg.name}"
    options = dict(cfg.options)
    silence_s = option(options, "silence_s", float, max(cfg.timeout_s, 2 * STABLE_INTERVAL_S),
                       where)
    if silence_s <= 0:
        raise ConfigurationError(f"option silence_s={silence_s} must be positive", where=where)
    baudrate = option(options, "baudrate", int, BAUDRATE, where)
    port = SerialPort(str(cfg.port), baudrate=baudrate)
    return Pms5003Sensor(cfg.name, ctx.clock, port, silence_s=silence_s, timeout_s=cfg.timeout_s)
