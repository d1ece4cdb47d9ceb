"""Modbus TCP: one connection per host:port, shared by every unit id behind it.

Wire format (Modbus messaging on TCP/IP implementation guide v1.0b, 3.1.3)::

    [transaction:2] [protocol=0:2] [length:2] [unit:1] [function:1] [data:n]
     length = 1 (unit) + 1 (function) + n

Requests from several sensors may be in flight at once; replies are matched by transaction id,
so a unit that never answers (behind a gateway) delays no one else. A lost connection fails
every pending request at once with DeviceNotReady; the next request reconnects after a capped,
jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
from collections.abc import Callable

from agent.aio import within
from drivers.base import DeviceNotReady, DriverError, ProtocolError
from drivers.serial import modbus

log = logging.getLogger(__name__)

Count = Callable[[str, int], None]
MAX_PDU = 253
MAX_IN_FLIGHT = 16
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 30.0


def _noop(key: str, n: int) -> None:
    pass


class TcpLink:
    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 3.0,
                 rng: random.Random | None = None) -> None:
        self.host, self.port = host, port
        self.where = f"tcp:{host}:{port}"
        self.connect_timeout_s = connect_timeout_s
        self.connects = 0
        self._rng = rng or random.Random()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._tid = 0
        self._failures = 0
        self._retry_at = 0.0
        self._connect_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._users = 0

    async def open(self) -> None:
        self._users += 1

    async def release(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0:
            await self.close()

    async def close(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        self._drop("connection closed")

    def _drop(self, reason: str) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(DeviceNotReady(reason, where=self.where))

    async def _connected(self) -> asyncio.StreamWriter:
        async with self._connect_lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            loop = asyncio.get_running_loop()
            wait = self._retry_at - loop.time()
            if wait > 0:
                raise DeviceNotReady(f"reconnecting in {wait:.1f} s", where=self.where)
            try:
                reader, writer = await within(asyncio.open_connection(self.host, self.port),
                                              self.connect_timeout_s)
            except (OSError, TimeoutError) as exc:
                self._failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** min(self._failures, 20))
                self._retry_at = loop.time() + delay / 2 + self._rng.uniform(0, delay / 2)
                raise DeviceNotReady(f"cannot connect: {exc or 'timed out'}",
                                     where=self.where) from None
            self._failures = 0
            self.connects += 1
            self._reader, self._writer = reader, writer
            self._pump = asyncio.create_task(self._read_replies(reader),
                                             name=f"modbus-tcp:{self.host}:{self.port}")
            return writer

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                head = await reader.readexactly(7)
                tid, proto, length = struct.unpack(">HHH", head[:6])
                if proto != 0 or not 2 <= length <= MAX_PDU + 1:
                    reason = f"bad MBAP header {head.hex(' ')}"
                    break  # the stream cannot be resynchronised: reconnect
                body = await reader.readexactly(length - 1)
                fut = self._pending.pop(tid, None)
                if fut is not None and not fut.done():
                    fut.set_result(head[6:7] + body)
        except (asyncio.IncompleteReadError, OSError) as exc:
            reason = f"connection lost: {exc!r}"
        finally:
            if self._reader is reader:
                self._drop(reason)

    async def read(self, unit: int, function: int, start: int, count: int, *,
                   timeout_s: float, retries: int, on_count: Count = _noop) -> tuple[int, ...]:
        where = f"{self.where} unit {unit}"
        bits = function in (modbus.FC_READ_COILS, modbus.FC_READ_DISCRETE)
        pdu = struct.pack(">BHH", function, start, count)
        last: DriverError | None = None
        for attempt in range(retries + 1):
            if attempt:
                on_count("retries", 1)
            async with self._slots:
                writer = await self._connected()
                self._tid = (self._tid + 1) & 0xFFFF
                tid = self._tid
                fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                self._pending[tid] = fut
                try:
                    writer.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
                    reply = await within(fut, timeout_s)
                except TimeoutError:
                    on_count("timeouts", 1)
                    last = DeviceNotReady(f"no reply to function {function:#04x} at "
                                          f"{start:#06x} within {timeout_s:g} s", where=where)
                    continue
                finally:
                    self._pending.pop(tid, None)
            try:
                return _parse(reply, unit, function, count, bits)
            except ProtocolError as exc:
                on_count("bad_replies" if "exception" not in str(exc) else "exception_replies", 1)
                last = ProtocolError(str(exc), where=where)
        assert last is not None
        raise last


def _parse(reply: bytes, unit: int, function: int, count: int, bits: bool) -> tuple[int, ...]:
    if len(reply) < 3 or reply[0] != unit:
        raise ProtocolError(f"reply from unit {reply[:1].hex()} to unit {unit}")
    fc = reply[1]
    if fc == function | modbus.EXCEPTION_FLAG:
        code = reply[2]
        raise ProtocolError(f"exception {code:#04x} ({modbus.exception_name(code)}) to "
                            f"function {function:#04x}")
    want = (count + 7) // 8 if bits else 2 * count
    if fc != function or reply[2] != want or len(reply) != 3 + want:
        raise ProtocolError(f"reply of {len(reply)} bytes does not answer function "
                            f"{function:#04x} for {count}")
    data = reply[3:]
    if bits:
        return tuple(data[i // 8] >> (i % 8) & 1 for i in range(count))
    return struct.unpack(f">{count}H", data)
