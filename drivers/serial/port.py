"""One serial port with chunked asyncio reads, bounded buffering and clear errors.

The port is opened with pyserial (so baud rate, framing and exclusive locking are the real
thing) and then read through the event loop's reader callback on its file descriptor: every
wake-up takes whatever the kernel holds, up to ``READ_CHUNK``, instead of pyserial's byte-by-byte
``readline()``.

Errors map to the driver error tree once, here:

- the path is missing or cannot be opened, a read fails or hits end of file (USB unplug, pty
  hang-up), a write fails or times out -> ``DeviceNotReady`` naming the port. The supervisor
  then calls ``close()`` and ``open()`` again with backoff.

Ports are named in config by ``/dev/serial/by-id/...`` so that USB renumbering does not move a
sensor; any path works, the symlink is resolved only when opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import termios
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import serial

from agent.aio import within
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady

log = logging.getLogger(__name__)

READ_CHUNK = 4096
DEFAULT_MAX_BUFFER = 64 * 1024


class SerialPort:
    """An open-able, re-open-able serial port.

    ``read`` returns what has arrived (waiting up to a timeout for something); bytes beyond
    ``max_buffer`` that the caller has not collected are dropped oldest-first and counted in
    ``overflow_bytes``, so a stalled consumer can never grow memory.
    """

    def __init__(
        self,
        path: str,
        *,
        baudrate: int,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        exclusive: bool = True,
        parity: str = "N",
        stopbits: int = 1,
    ) -> None:
        if max_buffer < READ_CHUNK:
            raise ValueError(f"max_buffer must be at least {READ_CHUNK} bytes")
        self.path = path
        self.baudrate = baudrate
        self.max_buffer = max_buffer
        self.exclusive = exclusive
        if parity not in ("N", "E", "O") or stopbits not in (1, 2):
            raise ValueError(f"framing 8{parity}{stopbits} is not 8N1, 8E1, 8O1, 8N2, ...")
        self.parity = parity
        self.stopbits = stopbits
        self.where = f"serial:{path}"
        self.overflow_bytes = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._ser: serial.Serial | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray()
        self._ready = asyncio.Event()
        self._error: str | None = None

    @property
    def is_open(self) -> bool:
        return self._ser is not None and self._error is None

    async def open(self, *, discard_input: bool = True) -> None:
        """Open (or re-open) the port. ``discard_input`` drops bytes queued while closed."""
        await self.close()
        self._loop = asyncio.get_running_loop()
        self._buf.clear()
        self._error = None
        self._ready = asyncio.Event()
        ser = serial.Serial(
            port=None,
            baudrate=self.baudrate,
            bytesize=serial.EIGHTBITS,
            parity=self.parity,
            stopbits=self.stopbits,
            timeout=0,
            write_timeout=0,
            exclusive=self.exclusive,
        )
        ser.port = self.path
        try:
            ser.open()  # opens O_NONBLOCK: never blocks the loop
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceNotReady(f"cannot open: {_reason(exc)}", where=self.where) from exc
        if discard_input:
            with contextlib.suppress(serial.SerialException, OSError, termios.error):
                ser.reset_input_buffer()
        self._ser = ser
        self._fd = ser.fileno()
        self._loop.add_reader(self._fd, self._on_readable)
        log.debug("%s: open at %d baud", self.where, self.baudrate)

    async def close(self) -> None:
        """Release the port. Never raises."""
        ser, self._ser = self._ser, None
        if ser is None:
            return
        if self._loop is not None and self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._fd = -1
        with contextlib.suppress(Exception):
            ser.close()
        self._ready.set()  # wake a reader so it sees the port closed

    def _fail(self, reason: str) -> None:
        if self._error is None:
            log.debug("%s: %s", self.where, reason)
            self._error = reason
        if self._loop is not None and self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._ready.set()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"read failed: {_reason(exc)}")
            return
        if not data:
            self._fail("device disconnected (end of file on read)")
            return
        self.bytes_in += len(data)
        self._buf += data
        excess = len(self._buf) - self.max_buffer
        if excess > 0:
            del self._buf[:excess]
            self.overflow_bytes += excess
        self._ready.set()

    def _check(self) -> None:
        if self._ser is None:
            raise DeviceNotReady("port is not open", where=self.where)
        if self._error is not None:
            raise DeviceNotReady(self._error, where=self.where)

    async def read(self, timeout_s: float) -> bytes:
        """Bytes received so far, waiting up to ``timeout_s`` for at least one.

        Returns ``b""`` on timeout. Raises DeviceNotReady once the port is lost (after the
        bytes that arrived before the loss have been handed out).
        """
        if not self._buf:
            self._check()
            self._ready.clear()
            try:
                await within(self._ready.wait(), timeout_s)
            except TimeoutError:
                return b""
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            return data
        self._check()
        return b""

    def discard_input(self) -> None:
        """Forget bytes received and not yet read (before a request, after a failed one)."""
        self._buf.clear()
        if self._ser is not None and self._error is None:
            try:
                self._ser.reset_input_buffer()
            except (serial.SerialException, OSError, termios.error) as exc:
                self._fail(f"flushing input failed: {_reason(exc)}")

    async def write(self, data: bytes, timeout_s: float) -> None:
        """Write all of ``data`` within ``timeout_s`` or raise DeviceNotReady."""
        self._check()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._fail(f"write failed: {_reason(exc)}")
                self._check()
                return
            self.bytes_out += n
            view = view[n:]
            if view:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DeviceNotReady(
                        f"write timed out after {timeout_s:g} s ({len(view)} bytes unsent)",
                        where=self.where,
                    )
                await self._writable(remaining)

    async def _writable(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._fd
        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await within(fut, timeout_s)
        except TimeoutError:
            pass  # the caller re-checks its deadline
        finally:
            loop.remove_writer(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or name} ({name})"
    text = str(exc)
    return text or type(exc).__name__


class AsyncClosable(Protocol):
    async def close(self) -> None: ...


T = TypeVar("T", bound=AsyncClosable)


def port_key(path: str) -> str:
    """A key naming the device behind ``path``, so two names for one port share it."""
    return f"serial:{os.path.realpath(path) if os.path.exists(path) else path}"


def shared(ctx: BuildContext, key: str, factory: Callable[[], T]) -> T:
    """The resource under ``key`` in ``ctx.shared``, created (and closed with the agent) once."""
    existing: Any = ctx.shared.get(key)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    made = factory()
    ctx.shared[key] = made
    ctx.stack.push_async_callback(made.close)
    return made


def option(options: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    """``options[key]`` converted to ``kind``, or a ConfigurationError naming the option."""
    if key not in options:
        return default
    value = options[key]
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"expected true/false, got {value!r}")
            return value
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"option {key}={value!r}: {exc}", where=where) from None
