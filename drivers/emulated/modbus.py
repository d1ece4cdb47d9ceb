"""Emulated Modbus devices: many units on one RS-485 line (a pty), or behind a Modbus TCP
server on loopback. Each unit serves any profile (``drivers.emulated.modbus_device``).

The pty has no baud rate, so a line made with ``baud`` set delays each reply by the wire time
of the request and the reply at that rate (``bits_per_char`` per byte, 10 for 8N1), as a real
line would: a driver on it cannot go faster than the real line.

Every reply is logged (``served``: unit, function, start, count, values), so a test can check
that the driver decoded exactly what the unit sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import time
from typing import Any

from drivers.base import ConfigurationError
from drivers.emulated.modbus_device import EmulatedUnit, TimeFn
from drivers.emulated.pty import PtyDevice
from drivers.modbus.profile import ResolvedPoint
from drivers.serial import modbus

log = logging.getLogger(__name__)

Served = tuple[int, int, int, int, tuple[int, ...]]
SERVED_LOG = 50_000


def reply_pdu(unit: EmulatedUnit, function: int, start: int, count: int,
              served: collections.deque[Served]) -> bytes:
    """The reply PDU (function + data) of one read."""
    got = unit.read(function, start, count)
    if isinstance(got, int):
        return bytes((function | modbus.EXCEPTION_FLAG, got))
    served.append((unit.unit, function, start, count, got))
    if function in (modbus.FC_READ_COILS, modbus.FC_READ_DISCRETE):
        data = bytearray((count + 7) // 8)
        for i, v in enumerate(got):
            if v:
                data[i // 8] |= 1 << (i % 8)
        return bytes((function, len(data))) + bytes(data)
    return bytes((function, 2 * count)) + b"".join(v.to_bytes(2, "big") for v in got)


class ModbusRtuLine(PtyDevice):
    """An RS-485 line with any number of units on it."""

    def __init__(self, name: str = "modbus", *, time_fn: TimeFn = time.time,
                 link_dir: str | None = None, seed: int = 0, baud: int | None = None,
                 bits_per_char: int = 10) -> None:
        super().__init__(name, link_dir=link_dir, seed=seed)
        self.time_fn = time_fn
        self.seed = seed
        self.baud = baud
        self.bits_per_char = bits_per_char
        self.units: dict[int, EmulatedUnit] = {}
        self.served: collections.deque[Served] = collections.deque(maxlen=SERVED_LOG)
        self.requests_seen = 0
        self.bad_requests = 0
        self._parser = modbus.RequestParser(self._count)
        self._queue: asyncio.Queue[modbus.Frame] = asyncio.Queue(maxsize=64)

    def _count(self, key: str, n: int) -> None:
        if key == "crc_errors":
            self.bad_requests += n

    def add_unit(self, unit: int, points: tuple[ResolvedPoint, ...]) -> EmulatedUnit:
        dev = EmulatedUnit(unit, points, self.time_fn, self.seed)
        self.units[unit] = dev
        return dev

    def received(self, data: bytes) -> None:
        for frame in self._parser.feed(data):
            self.requests_seen += 1
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(frame)

    def wire_s(self, nbytes: int) -> float:
        return 0.0 if not self.baud else nbytes * self.bits_per_char / self.baud

    async def run(self) -> None:
        while True:
            req = await self._queue.get()
            dev = self.units.get(req.address)
            if dev is None or not dev.answering() or len(req.data) != 4:
                continue  # nobody there, or a silent unit: the host times out
            start, count = struct.unpack(">HH", req.data)
            frame = modbus.with_crc(bytes((dev.unit,))
                                    + reply_pdu(dev, req.function, start, count, self.served))
            wire = self.wire_s(8 + len(frame))
            if wire:
                await asyncio.sleep(wire)
            if dev.corrupt > 0:
                dev.corrupt -= 1
                frame = self.corrupt_frame(frame)
            await self.send(frame)


class ModbusTcpServer:
    """Units behind one Modbus TCP server on loopback; ``unplug``/``replug`` make it vanish
    (connections dropped, port refusing) and come back on the same port."""

    def __init__(self, *, time_fn: TimeFn = time.time, seed: int = 0) -> None:
        self.time_fn = time_fn
        self.seed = seed
        self.units: dict[int, EmulatedUnit] = {}
        self.served: collections.deque[Served] = collections.deque(maxlen=SERVED_LOG)
        self._sock = self._listen(0)
        self.port = self._sock.getsockname()[1]
        self.path = f"tcp://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        return sock

    def add_unit(self, unit: int, points: tuple[ResolvedPoint, ...]) -> EmulatedUnit:
        dev = EmulatedUnit(unit, points, self.time_fn, self.seed)
        self.units[unit] = dev
        return dev

    async def start(self) -> None:
        if self._server is None:
            if self._sock is None:
                self._sock = self._listen(self.port)
            self._server = await asyncio.start_server(self._serve, sock=self._sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readexactly(7)
                tid, proto, length = struct.unpack(">HHH", head[:6])
                if proto != 0 or not 2 <= length <= 254:
                    break
                body = await reader.readexactly(length - 1)
                dev = self.units.get(head[6])
                if dev is None or not dev.answering() or len(body) != 5:
                    continue
                function, start, count = struct.unpack(">BHH", body)
                pdu = reply_pdu(dev, function, start, count, self.served)
                if dev.corrupt > 0:
                    dev.corrupt -= 1
                    pdu = pdu[:2]  # a byte count with no data behind it
                writer.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, dev.unit) + pdu)
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def unplug(self) -> None:
        """Vanish: drop every connection and refuse new ones."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._sock = None  # type: ignore[assignment]

    async def replug(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.unplug()


def emulate(cfg: Any, ctx: Any) -> ModbusRtuLine | ModbusTcpServer:
    """The emulated line (or TCP server) of a ``port = "emulated"`` modbus sensor, shared by
    every sensor naming the same ``bus``; the unit serves the sensor's own profile.

    ``[sensors.options.emulator]``: ``bus`` (default "default"), ``transport`` ("rtu" or
    "tcp"), ``seed``, ``baud_paced`` (true: delay replies by their wire time), ``link_dir``.
    """
    from drivers.modbus.options import resolve
    from drivers.modbus.profile import ProfileError
    from drivers.serial.port import shared

    where = f"sensor {cfg.name} emulator"
    emu: dict[str, Any] = dict(cfg.options.get("emulator", {}))
    bus = str(emu.get("bus", "default"))
    transport = str(emu.get("transport", "rtu"))
    clock = ctx.clock
    try:
        spec = resolve(dict(cfg.options))
        seed = int(emu.get("seed", 0))
    except (ProfileError, TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc), where=where) from None
    line: ModbusRtuLine | ModbusTcpServer
    if transport == "tcp":
        line = shared(ctx, f"emulated:modbus-tcp:{bus}",
                      lambda: ModbusTcpServer(time_fn=lambda: clock.wall_ns() / 1e9, seed=seed))
    elif transport == "rtu":
        from drivers.modbus.rtu import bits_per_char

        paced = bool(emu.get("baud_paced", False))
        line = shared(ctx, f"emulated:modbus:{bus}", lambda: ModbusRtuLine(
            f"modbus-{bus}", time_fn=lambda: clock.wall_ns() / 1e9,
            link_dir=emu.get("link_dir"), seed=seed,
            baud=spec.baudrate if paced else None,
            bits_per_char=bits_per_char(spec.parity, spec.stopbits)))
    else:
        raise ConfigurationError(f"transport {transport!r} is not rtu or tcp", where=where)
    unit = cfg.address if cfg.address is not None else 1
    if unit not in line.units:
        line.add_unit(unit, spec.points)
    return line
