"""A lossy serial line for bridge tests, and the tests of the line itself.

``LossyLine`` joins a host-side ``asyncio.Protocol`` (the bridge ``Link``) to the emulated MCU
(``DeviceCore``) through two one-way pipes. Each pipe can deliver one byte per event-loop step,
drop bytes, corrupt bytes, drop whole writes and add latency, from a seeded RNG, so that a test
can throw realistic line faults at the real protocol on both ends. Byte order is kept (a UART
never reorders).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from firmware_bridge.device import DeviceCore, DeviceSettings


@dataclass
class Impairment:
    drop: float = 0.0  # probability that a byte is lost
    corrupt: float = 0.0  # probability that a byte is changed
    delay_s: float = 0.0  # latency added to every write
    chunk: int = 1  # bytes handed over per event-loop step
    drop_writes: int = 0  # drop this many whole writes next (then 0 again)


class Pipe:
    """One direction of the line. ``counters`` tells what the impairments did."""

    def __init__(self, name: str, impairment: Impairment, rng: random.Random) -> None:
        self.name = name
        self.impairment = impairment
        self.rng = rng
        self.receiver: Callable[[bytes], None] | None = None
        self.counters = {"bytes_in": 0, "bytes_out": 0, "dropped": 0, "corrupted": 0,
                         "writes_dropped": 0}
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump(), name=f"pipe-{self.name}")

    def write(self, data: bytes) -> None:
        imp = self.impairment
        self.counters["bytes_in"] += len(data)
        if imp.drop_writes > 0:
            imp.drop_writes -= 1
            self.counters["writes_dropped"] += 1
            return
        due = asyncio.get_running_loop().time() + imp.delay_s
        self._queue.put_nowait((due, bytes(data)))

    def _impair(self, data: bytes) -> bytes:
        imp = self.impairment
        out = bytearray()
        for byte in data:
            if imp.drop and self.rng.random() < imp.drop:
                self.counters["dropped"] += 1
                continue
            if imp.corrupt and self.rng.random() < imp.corrupt:
                out.append(byte ^ self.rng.randrange(1, 256))
                self.counters["corrupted"] += 1
            else:
                out.append(byte)
        return bytes(out)

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self._queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # models line latency, not synchronisation
            data = self._impair(data)
            step = max(1, self.impairment.chunk)
            for i in range(0, len(data), step):
                if self.receiver is None:
                    break
                piece = data[i:i + step]
                self.counters["bytes_out"] += len(piece)
                self.receiver(piece)
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class HostEnd(asyncio.Transport):
    """The transport the host protocol writes to."""

    def __init__(self, line: LossyLine) -> None:
        super().__init__()
        self._line = line
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._line.to_device.write(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._line.disconnect(None)

    def abort(self) -> None:
        self._line.disconnect(None)


class LossyLine:
    """Host protocol <-> emulated device over two impaired pipes."""

    def __init__(self, protocol: asyncio.Protocol, device: DeviceCore, *,
                 to_device: Impairment | None = None, to_host: Impairment | None = None,
                 seed: int = 1) -> None:
        rng = random.Random(seed)
        self.protocol = protocol
        self.device = device
        self.to_device = Pipe("to-device", to_device or Impairment(), rng)
        self.to_host = Pipe("to-host", to_host or Impairment(), rng)
        self.transport = HostEnd(self)
        self.connected = False

    async def start(self) -> None:
        self.to_device.receiver = self.device.feed
        self.to_host.receiver = self.protocol.data_received
        self.to_device.start()
        self.to_host.start()
        self.device.start()
        self.device.attach(self.to_host.write)
        self.connected = True
        self.protocol.connection_made(self.transport)

    def disconnect(self, exc: Exception | None) -> None:
        """Pull the cable: both ends see it at once."""
        if not self.connected:
            return
        self.connected = False
        self.transport._closing = True
        self.to_device.receiver = None
        self.to_host.receiver = None
        self.device.detach()
        self.protocol.connection_lost(exc)

    async def stop(self) -> None:
        self.disconnect(None)
        self.device.stop()
        await self.to_device.stop()
        await self.to_host.stop()


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class Sink:
    """Stands in for the device when a test looks at the bytes only."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.pieces: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.got += data
        self.pieces.append(data)


async def _pipe(impairment: Impairment, seed: int = 3) -> tuple[Pipe, Sink]:
    pipe = Pipe("t", impairment, random.Random(seed))
    sink = Sink()
    pipe.receiver = sink.feed
    pipe.start()
    return pipe, sink


async def _drain(pipe: Pipe, sink: Sink, want: int) -> None:
    async def until() -> None:
        while pipe.counters["bytes_out"] < want:
            await asyncio.sleep(0)

    await asyncio.wait_for(until(), 5)


async def test_pipe_delivers_one_byte_at_a_time_in_order() -> None:
    pipe, sink = await _pipe(Impairment(chunk=1))
    pipe.write(b"abc")
    pipe.write(b"defg")
    await _drain(pipe, sink, 7)
    await pipe.stop()
    assert bytes(sink.got) == b"abcdefg"
    assert all(len(p) == 1 for p in sink.pieces)


async def test_pipe_drops_and_corrupts_at_the_given_rates() -> None:
    pipe, sink = await _pipe(Impairment(drop=0.1, corrupt=0.1, chunk=64))
    pipe.write(bytes(10_000))

    async def until() -> None:
        while pipe.counters["bytes_out"] + pipe.counters["dropped"] < 10_000:
            await asyncio.sleep(0)

    await asyncio.wait_for(until(), 5)
    await pipe.stop()
    assert 800 < pipe.counters["dropped"] < 1200
    assert len(sink.got) == 10_000 - pipe.counters["dropped"]
    changed = sum(1 for b in sink.got if b != 0)
    assert changed == pipe.counters["corrupted"]
    assert 700 < changed < 1100


async def test_pipe_drops_whole_writes_and_adds_latency() -> None:
    pipe, sink = await _pipe(Impairment(drop_writes=1, delay_s=0.05, chunk=8))
    loop = asyncio.get_running_loop()
    pipe.write(b"lost")
    start = loop.time()
    pipe.write(b"kept")
    await _drain(pipe, sink, 4)
    await pipe.stop()
    assert bytes(sink.got) == b"kept"
    assert loop.time() - start >= 0.05
    assert pipe.counters["writes_dropped"] == 1


async def test_line_disconnect_reaches_both_ends() -> None:
    device = DeviceCore(DeviceSettings(report_interval_s=60))
    host = Recorder()
    line = LossyLine(host, device)
    await line.start()
    line.transport.write(b"\x00")
    line.disconnect(OSError("unplugged"))
    await line.stop()
    assert len(host.lost) == 1 and isinstance(host.lost[0], OSError)
    assert line.transport.is_closing()
