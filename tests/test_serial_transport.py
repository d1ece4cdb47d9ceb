"""The serial port as an asyncio transport (what the bridge link runs on): bytes both ways in
order on a real pty, a lock held by another opener refused, an unplugged device ending the
connection with its reason, and close() writing what is queued first."""

from __future__ import annotations

import asyncio
import os

import pytest
import serial

from drivers.base import DeviceNotReady
from drivers.serial.transport import open_serial_connection
from tests.waiting import until


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: list[Exception | None] = []
        self.made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def _read_all(fd: int, want: int) -> bytes:
    got = b""
    while len(got) < want:
        got += os.read(fd, want - len(got))
    return got


async def test_bytes_both_ways_and_close_writes_the_queue(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    transport, proto = await open_serial_connection(Recorder, path, baudrate=115200)
    assert isinstance(proto, Recorder) and proto.made == 1
    os.write(master, b"\x00hello\x00")
    await until(lambda: bytes(proto.data) == b"\x00hello\x00", 10, "the bytes to arrive")
    chunks = [bytes([i]) * 100 for i in range(1, 40)]
    for chunk in chunks:
        transport.write(chunk)
    transport.close()
    assert transport.is_closing()
    got = await asyncio.to_thread(_read_all, master, sum(map(len, chunks)))
    assert got == b"".join(chunks)
    await until(lambda: proto.lost == [None], 10, "the connection to end")
    transport.write(b"after close")  # ignored, as a closed socket transport does
    assert transport.get_write_buffer_size() == 0


async def test_a_port_someone_holds_is_refused(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    holder = serial.Serial(path, exclusive=True)
    try:
        with pytest.raises(DeviceNotReady, match="cannot open"):
            await open_serial_connection(Recorder, path, baudrate=115200)
    finally:
        holder.close()


async def test_an_unplugged_device_ends_the_connection_with_the_reason() -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    transport, proto = await open_serial_connection(Recorder, path, baudrate=115200)
    assert isinstance(proto, Recorder)
    os.close(slave)
    os.close(master)  # the far end goes away: the read fails (EIO), as on a USB unplug
    await until(lambda: len(proto.lost) == 1, 10, "the connection to be lost")
    assert isinstance(proto.lost[0], DeviceNotReady)
    assert transport.is_closing()
