"""A serial device on a pseudo-terminal: the emulator holds the master, a driver opens the slave.

The driver is given a stable path, a symlink in ``link_dir`` (like ``/dev/serial/by-id/...``),
because a replugged pty gets a new ``/dev/pts/N`` just as a replugged USB adapter may get a new
``/dev/ttyUSBn``. ``unplug()`` closes the pty and removes the link; the driver's reads hit end of
file and its re-open fails until ``replug()`` makes a new pty and points the link at it.

Faults a real line shows, injected per outgoing frame or as a state:

- ``garbage``   random bytes before the next frame(s)
- ``truncate``  the next frame(s) cut short
- ``corrupt``   the next frame(s) with a wrong CRC/checksum (``corrupt_frame`` per device)
- ``silent``    the device stops sending (state)
- ``delay_s``   each frame sent this late (state): a slow device
- ``dribble_s`` each byte written alone, this long apart (state): a slow line

Subclasses implement ``received(data)`` (bytes the host wrote; must not raise) and ``run()``
(the device's own loop, started by ``start()`` as one named task).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import random
import shutil
import tempfile
import tty
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

READ_CHUNK = 4096


@dataclass
class Faults:
    garbage: int = 0  # frames still to prefix with garbage
    garbage_bytes: int = 16
    truncate: int = 0  # frames still to cut short
    corrupt: int = 0  # frames still to send with a bad check value
    silent: bool = False
    delay_s: float = 0.0
    dribble_s: float = 0.0


class PtyDevice(abc.ABC):
    """Base of the serial device emulators."""

    def __init__(self, name: str, *, link_dir: str | Path | None = None, seed: int = 0) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.faults = Faults()
        self._own_dir = link_dir is None
        self.link_dir = Path(tempfile.mkdtemp(prefix="edge-agent-serial-")) if link_dir is None \
            else Path(link_dir)
        self.link_dir.mkdir(parents=True, exist_ok=True)
        self.path = str(self.link_dir / name)
        self.device_path = ""
        self.frames_sent = 0
        self.bytes_dropped = 0
        self._master = -1
        self._slave = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._make_pty()

    # -- pty life cycle -------------------------------------------------------------------

    @property
    def plugged(self) -> bool:
        return self._master >= 0

    def _make_pty(self) -> None:
        master, slave = os.openpty()
        # Raw before anyone writes: a cooked slave would echo device output back as input.
        tty.setraw(slave)
        tty.setraw(master)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.device_path = os.ttyname(slave)
        tmp = f"{self.path}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(self.device_path, tmp)
        os.replace(tmp, self.path)
        if self._loop is not None:
            self._loop.add_reader(master, self._on_readable)
        log.debug("%s: pty %s linked at %s", self.name, self.device_path, self.path)

    def unplug(self) -> None:
        """Disconnect: the host sees end of file, and the port path disappears."""
        if self._master < 0:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._master)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = -1
        log.debug("%s: unplugged", self.name)

    def replug(self) -> None:
        """Reconnect on a new pty; the stable path now leads to it."""
        if self._closed:
            raise RuntimeError(f"{self.name}: emulator is closed")
        self.unplug()
        self._make_pty()

    async def start(self) -> None:
        """Attach to the running loop and start the device's own task (idempotent)."""
        if self._closed:
            raise RuntimeError(f"{self.name}: emulator is closed")
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        if self._master >= 0:
            self._loop.remove_reader(self._master)
            self._loop.add_reader(self._master, self._on_readable)
        self._task = asyncio.create_task(self.run(), name=f"emulator:{self.name}")

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.unplug()
        if self._own_dir:
            shutil.rmtree(self.link_dir, ignore_errors=True)

    # -- bytes in -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # host side closed; we keep the slave open, so this is transient
        if data:
            try:
                self.received(data)
            except Exception:  # a device never dies of its input
                log.debug("%s: error handling %r", self.name, data[:32], exc_info=True)

    @abc.abstractmethod
    def received(self, data: bytes) -> None:
        """Bytes the host wrote. Must not raise."""

    @abc.abstractmethod
    async def run(self) -> None:
        """The device's own behaviour (streaming, answering queued requests)."""

    # -- bytes out ------------------------------------------------------------------------

    def corrupt_frame(self, frame: bytes) -> bytes:
        """The frame with a wrong check value. Default: flip bits in the last byte."""
        return frame[:-1] + bytes((frame[-1] ^ 0x5A,)) if frame else frame

    def write_raw(self, data: bytes) -> None:
        """Put bytes on the line now; dropped (and counted) while unplugged or the host lags."""
        if self._master < 0:
            self.bytes_dropped += len(data)
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._master, view)
            except BlockingIOError:
                self.bytes_dropped += len(view)
                return
            except OSError:
                self.bytes_dropped += len(view)
                return
            view = view[n:]

    def garbage(self, n: int) -> bytes:
        return bytes(self.rng.randrange(256) for _ in range(n))

    async def send(self, frame: bytes) -> None:
        """Send one frame through the fault injector."""
        f = self.faults
        if f.silent:
            return
        if f.delay_s > 0:
            await asyncio.sleep(f.delay_s)
        if f.garbage > 0:
            f.garbage -= 1
            frame = self.garbage(f.garbage_bytes) + frame
        if f.corrupt > 0:
            f.corrupt -= 1
            frame = self.corrupt_frame(frame)
        if f.truncate > 0:
            f.truncate -= 1
            frame = frame[: self.rng.randrange(1, max(2, len(frame) - 1))]
        if f.dribble_s > 0:
            for b in frame:
                self.write_raw(bytes((b,)))
                await asyncio.sleep(f.dribble_s)
        else:
            self.write_raw(frame)
        self.frames_sent += 1

    def inject(self, kind: str, count: int = 1) -> None:
        """Queue ``count`` frame faults of ``kind`` (garbage, truncate, corrupt)."""
        if kind not in ("garbage", "truncate", "corrupt"):
            raise ValueError(f"unknown fault {kind!r}: expected garbage, truncate or corrupt")
        setattr(self.faults, kind, getattr(self.faults, kind) + count)


class PtyLink:
    """A null-modem cable between two ptys: whatever one side's host writes, the other reads.

    Lets two programs that each open a serial port *by name* talk (e.g. a Modbus server
    library playing a meter, and a driver), since pyserial cannot open a pty master.
    """

    def __init__(self) -> None:
        self._fds: list[int] = []
        self.paths: tuple[str, str] = ("", "")
        ends: list[tuple[int, int]] = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)
            tty.setraw(master)
            os.set_blocking(master, False)
            ends.append((master, slave))
            self._fds += [master, slave]
        self._a, self._b = ends[0][0], ends[1][0]
        self.paths = (os.ttyname(ends[0][1]), os.ttyname(ends[1][1]))
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._a, self._pump, self._a, self._b)
        self._loop.add_reader(self._b, self._pump, self._b, self._a)

    @staticmethod
    def _pump(src: int, dst: int) -> None:
        try:
            data = os.read(src, READ_CHUNK)
            os.write(dst, data)
        except OSError:
            pass  # a side closed or is full: bytes on a cut cable are lost

    def close(self) -> None:
        if self._loop is not None:
            for fd in (self._a, self._b):
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
