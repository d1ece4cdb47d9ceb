"""The serial port shell on real pty pairs: chunked reads, bounds, and errors that name the port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re

import pytest

from drivers.base import DeviceNotReady
from drivers.emulated.pty import PtyDevice
from drivers.serial.port import SerialPort
from tests.waiting import until


async def test_missing_port_is_not_ready_and_named() -> None:
    port = SerialPort("/dev/serial/by-id/usb-nothing-here", baudrate=9600)
    with pytest.raises(DeviceNotReady, match=r"^serial:/dev/serial/by-id/usb-nothing-here: cannot"):
        await port.open()
    assert not port.is_open
    with pytest.raises(DeviceNotReady, match="port is not open"):
        await port.read(0.01)


async def test_reads_come_in_chunks(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    port = SerialPort(path, baudrate=115200)
    await port.open()
    try:
        assert await port.read(0.02) == b""  # a timeout is an empty read, not an error
        payload = bytes(range(256)) * 16
        os.write(master, payload)
        got = b""
        reads = 0
        while len(got) < len(payload):
            got += await port.read(1.0)
            reads += 1
        assert got == payload
        assert reads < len(payload) // 64  # whole chunks, not bytes
        await port.write(b"ping", 1.0)
        assert os.read(master, 16) == b"ping"
    finally:
        await port.close()


async def test_unread_input_is_bounded(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    os.set_blocking(master, False)
    port = SerialPort(path, baudrate=115200, max_buffer=4096)
    await port.open()
    try:
        total = 0
        block = b"x" * 1024
        while total < 20 * 1024:
            with contextlib.suppress(BlockingIOError):
                total += os.write(master, block)
            await asyncio.sleep(0)  # the port's reader drains the kernel buffer meanwhile
        await until(lambda: port.bytes_in == total, 2.0)
        data = await port.read(0.1)
        assert len(data) == 4096
        assert port.overflow_bytes == total - 4096
    finally:
        await port.close()


async def test_writes_that_cannot_drain_time_out(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    port = SerialPort(path, baudrate=9600)
    await port.open()
    try:
        with pytest.raises(DeviceNotReady, match=r"write timed out after 0\.1 s"):
            await port.write(b"y" * 4_000_000, 0.1)  # nobody reads the other end
    finally:
        await port.close()


class _Echo(PtyDevice):
    def received(self, data: bytes) -> None:
        self.write_raw(data)

    async def run(self) -> None:
        await asyncio.Event().wait()


async def test_unplug_is_not_ready_and_replug_reopens_by_the_same_path() -> None:
    dev = _Echo("echo")
    await dev.start()
    port = SerialPort(dev.path, baudrate=9600)
    try:
        await port.open()
        await port.write(b"hello", 1.0)
        assert await port.read(1.0) == b"hello"
        dev.unplug()
        lost = rf"serial:{re.escape(dev.path)}: device disconnected"
        with pytest.raises(DeviceNotReady, match=lost):
            await port.read(1.0)
        with pytest.raises(DeviceNotReady, match="cannot open"):
            await port.open()
        dev.replug()
        await port.open()
        assert os.path.realpath(dev.path) == dev.device_path  # the stable name follows
        await port.write(b"again", 1.0)
        assert await port.read(1.0) == b"again"
    finally:
        await port.close()
        await dev.close()
    assert not os.path.exists(dev.link_dir)


async def test_port_is_exclusive(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    a = SerialPort(path, baudrate=9600)
    b = SerialPort(path, baudrate=9600)
    await a.open()
    try:
        with pytest.raises(DeviceNotReady, match="exclusively lock"):
            await b.open()
    finally:
        await a.close()
        await b.close()


def test_fault_names_are_checked() -> None:
    dev = _Echo("echo")
    try:
        with pytest.raises(ValueError, match="unknown fault 'noise'"):
            dev.inject("noise")
        dev.inject("garbage", 2)
        assert dev.faults.garbage == 2
    finally:
        asyncio.run(dev.close())
