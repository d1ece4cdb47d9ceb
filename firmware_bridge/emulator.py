"""The bridge MCU on a pty: the device state machine (``device.DeviceCore``) behind a serial port
that pyserial opens like any other.

The emulator holds the pty master; the host opens the slave through a stable symlink
(``port``), the way a gateway opens ``/dev/serial/by-id/...``. ``unplug()`` closes the pty and
removes the symlink (the host's reads fail, as when a USB-CDC cable is pulled); ``replug()``
makes a new pty and points the same symlink at it. The MCU keeps running while unplugged
(powered from the cabinet), unless ``unplug(power_loss=True)``.

The emulator also keeps a descriptor of the slave open: without it the master reports a hangup
whenever the host has the port closed, and a reader on it would spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
import tty
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from firmware_bridge.device import DeviceCore, DeviceSettings

log = logging.getLogger(__name__)

MAX_TX_BUFFER_BYTES = 64 * 1024  # beyond this the "UART" drops bytes, like a full TX FIFO
_READ_BYTES = 4096


class _Pty:
    """One pty pair, read and written without blocking from the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_data: Callable[[bytes], None]) -> None:
        self._loop = loop
        self._on_data = on_data
        self.master, self._keep = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self._keep)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._keep)
        self._out = bytearray()
        self._writing = False
        self.dropped = 0
        self._closed = False
        loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("pty %s read failed: %s", self.path, exc)
            return
        if data:
            self._on_data(data)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if len(self._out) + len(data) > MAX_TX_BUFFER_BYTES:
            self.dropped += len(data)
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        try:
            n = os.write(self.master, self._out) if self._out else 0
        except BlockingIOError:
            n = 0
        except OSError as exc:
            log.debug("pty %s write failed: %s", self.path, exc)
            self._out.clear()
            n = 0
        del self._out[:n]
        if self._out and not self._writing:
            self._loop.add_writer(self.master, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self.master)
            self._writing = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.master)
        if self._writing:
            self._loop.remove_writer(self.master)
        for fd in (self.master, self._keep):
            with contextlib.suppress(OSError):
                os.close(fd)


class BridgeEmulator:
    """An emulated bridge MCU behind a pty. Use ``async with BridgeEmulator() as emu``."""

    def __init__(self, port: str | os.PathLike[str] | None = None,
                 settings: DeviceSettings | None = None, *,
                 time_fn: Callable[[], float] = time.time, day_offset_s: float = 0.0) -> None:
        self._tmpdir: str | None = None
        if port is None:
            self._tmpdir = tempfile.mkdtemp(prefix="bridge-")
            port = Path(self._tmpdir) / "ttyBRIDGE0"
        self.port = str(port)
        self.device = DeviceCore(settings, time_fn, day_offset_s=day_offset_s)
        self._pty: _Pty | None = None
        self._started = False

    @property
    def plugged(self) -> bool:
        return self._pty is not None

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.device.start()
        self.replug()

    def replug(self, *, power_on: bool = False) -> None:
        """Connect the cable: a new pty behind the same symlink path."""
        if self._pty is not None:
            return
        if power_on:
            self.device.start()
        pty = _Pty(asyncio.get_running_loop(), self.device.feed)
        tmp = f"{self.port}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(pty.path, tmp)
        os.replace(tmp, self.port)
        self._pty = pty
        self.device.attach(pty.write)
        log.debug("bridge emulator plugged in at %s -> %s", self.port, pty.path)

    def unplug(self, *, power_loss: bool = False) -> None:
        """Pull the cable: the host's port fails and the device path disappears."""
        pty, self._pty = self._pty, None
        if pty is None:
            return
        self.device.detach()
        if power_loss:
            self.device.power_off()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port)
        pty.close()
        log.debug("bridge emulator unplugged from %s", self.port)

    async def close(self) -> None:
        self.unplug()
        self.device.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
