"""A TCP relay between a client and a real broker on loopback, with faults the broker cannot make.

``eat_pubacks`` drops every PUBACK from the broker but the first of each connection (the
birth message's), so a publish stays in flight for as long as the test wants; ``cut()``
resets every relayed connection while the relay keeps listening (the "broker" is up again at
once, as after a network drop). Packets are read with the MQTT fixed header: type in the high
nibble of the first byte, then the remaining length as a variable byte integer (MQTT 5.0,
2.1.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from tests.broker import free_port

PUBACK = 4


def _packet_length(buf: bytearray) -> int | None:
    """Total length of the first packet in ``buf``, or None if it is not complete yet."""
    mult, value = 1, 0
    for i in range(1, 5):
        if i >= len(buf):
            return None
        b = buf[i]
        value += (b & 0x7F) * mult
        if not b & 0x80:
            total = 1 + i + value
            return total if len(buf) >= total else None
        mult *= 128
    raise ValueError("malformed remaining length")


class Relay:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.eat_pubacks = False
        self.eaten = 0
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        """Reset every relayed connection (RST to the client, close to the broker)."""
        for client, upstream in list(self._conns):
            sock = client.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()
            upstream.transport.abort()
        self._conns.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        for coro in (self._pipe(reader, up_writer), self._down(up_reader, writer)):
            task = asyncio.create_task(coro, name="relay")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        pubacks = 0
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                buf += data
                while (n := _packet_length(buf)) is not None:
                    packet, buf = bytes(buf[:n]), buf[n:]
                    if packet[0] >> 4 == PUBACK:
                        pubacks += 1
                        if self.eat_pubacks and pubacks > 1:
                            self.eaten += 1
                            continue
                    writer.write(packet)
                await writer.drain()
        writer.transport.abort()
