"""A serial port as an asyncio transport, for code written as an ``asyncio.Protocol``.

The bridge link speaks to its microcontroller as a protocol (``data_received``,
``connection_lost``); this gives it the same ``SerialPort`` the sensor drivers read (its
reader callback, bounded buffer, exclusive lock and error mapping), so the project has one
way of doing serial I/O. A task hands what arrives to the protocol; writes are queued and
written in order by another, each within a timeout. A port that fails (unplugged, write timed
out) ends the connection with the reason, as a socket transport would.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from drivers.base import DeviceNotReady
from drivers.serial.port import SerialPort

WRITE_TIMEOUT_S = 5.0
READ_WAIT_S = 3600.0  # a quiet line is not an error: wake up now and then regardless


class SerialTransport(asyncio.Transport):
    def __init__(self, port: SerialPort, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.port = port
        self._protocol = protocol
        self._pending: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._lost = False
        self._reader = asyncio.create_task(self._read(), name=f"read:{port.where}")
        self._writer = asyncio.create_task(self._write(), name=f"write:{port.where}")

    # -- asyncio.Transport ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._pending.append(bytes(data))
        self._wake.set()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Write what is queued, then close the port."""
        if self._closing:
            return
        self._closing = True
        self._reader.cancel()
        self._wake.set()  # the writer drains and ends

    def abort(self) -> None:
        """Close now; what is queued is dropped."""
        self._closing = True
        self._pending.clear()
        self._reader.cancel()
        self._writer.cancel()
        asyncio.get_running_loop().create_task(self._finish(None), name="serial-abort")

    def get_write_buffer_size(self) -> int:
        return sum(len(b) for b in self._pending)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.port.path if name == "serial" else default

    # -- the two tasks ----------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                data = await self.port.read(READ_WAIT_S)
                if data:
                    self._protocol.data_received(data)
        except DeviceNotReady as exc:
            await self._finish(exc)

    async def _write(self) -> None:
        try:
            while True:
                while self._pending:
                    await self.port.write(self._pending[0], WRITE_TIMEOUT_S)
                    self._pending.popleft()
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
        except DeviceNotReady as exc:
            self._reader.cancel()
            await self._finish(exc)
            return
        await self._finish(None)

    async def _finish(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        await self.port.close()
        self._protocol.connection_lost(exc)


async def open_serial_connection(
        protocol_factory: Callable[[], asyncio.Protocol], path: str, *,
        baudrate: int) -> tuple[SerialTransport, asyncio.Protocol]:
    """Open ``path`` (exclusively) and connect a protocol to it; DeviceNotReady if it cannot
    be opened."""
    port = SerialPort(path, baudrate=baudrate)
    await port.open()
    protocol = protocol_factory()
    try:
        transport = SerialTransport(port, protocol)
    except BaseException:
        await port.close()
        raise
    protocol.connection_made(transport)
    return transport, protocol
