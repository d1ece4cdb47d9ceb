"""One Modbus RTU line that several devices share: the port, its users, and one exchange.

Opened by the first device, closed after the last; ``_lock`` serialises transactions. Frames
are delimited by line silence (Modbus over serial line v1.02, 2.5.1.1: 3.5 character times), so
every request waits until ``gap_s`` has passed since the line last carried a frame.
"""

from __future__ import annotations

import asyncio

from drivers.serial import modbus
from drivers.serial.port import SerialPort

RECEIVED_KEPT = 256  # bytes of a bad reply kept to describe it


class SharedLine:
    def __init__(self, port: SerialPort, gap_s: float) -> None:
        self.port = port
        self.gap_s = gap_s
        self.transactions = 0
        self._lock = asyncio.Lock()
        self._users = 0
        self._quiet_until = 0.0

    async def open(self) -> None:
        """Open the port unless it is already open and healthy (another device may use it)."""
        async with self._lock:
            if not self.port.is_open:
                await self.port.open()
            self._users += 1

    async def release(self) -> None:
        async with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                await self.port.close()

    async def close(self) -> None:
        self._users = 0
        await self.port.close()

    async def exchange(self, request: bytes, parser: modbus.ReplyParser, timeout_s: float,
                       received: bytearray) -> modbus.Frame | None:
        """One request and its first well-formed reply, or None; the caller holds ``_lock``.
        What arrived is kept in ``received`` (bounded) to say why a reply was bad."""
        port = self.port
        loop = asyncio.get_running_loop()
        if not port.is_open:
            await port.open()  # re-open after a lost port; raises DeviceNotReady if still gone
        gap = self._quiet_until - loop.time()
        if gap > 0:
            await asyncio.sleep(gap)
        port.discard_input()
        await port.write(request, timeout_s)
        self.transactions += 1
        deadline = loop.time() + timeout_s
        try:
            while (remaining := deadline - loop.time()) > 0:
                data = await port.read(remaining)
                if len(received) < RECEIVED_KEPT:
                    received += data
                frames = parser.feed(data)
                if frames:
                    return frames[0]
            return None
        finally:
            self._quiet_until = loop.time() + self.gap_s
