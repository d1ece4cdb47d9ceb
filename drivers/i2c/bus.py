"""One worker thread per I2C bus, so blocking smbus calls never run on the event loop.

A bus is named in config as ``bus = N`` (the Linux adapter ``/dev/i2c-N``) or
``bus = "emulated"`` (the agent's emulated bus, see ``drivers.emulated.i2c_bus``). Every sensor on
the same bus shares one ``AsyncI2CBus`` kept in ``BuildContext.shared`` under ``"i2c:N"`` /
``"i2c:emulated"`` and closed by ``BuildContext.stack`` when the agent stops.

The device file is opened lazily, on the worker thread, by the first call that needs it: never
at import, never for a bus the config does not name, and never a default bus. After a fault
that is not a plain NACK (EIO, a timed-out adapter) ``invalidate()`` makes the next call close
and reopen the file, so a wedged adapter driver gets a fresh handle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from agent.aio import within
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady

if TYPE_CHECKING:
    from smbus2 import i2c_msg

log = logging.getLogger(__name__)

T = TypeVar("T")
BusName = int | Literal["emulated"]
CLOSE_TIMEOUT_S = 2.0


class BusTimeout(DeviceNotReady):
    """A bus call did not return in time (a wedged adapter or a device stretching the clock)."""


class SMBusLike(Protocol):
    """The part of ``smbus2.SMBus`` the drivers use; emulated buses provide the same calls."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...
    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...
    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]: ...
    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int]) -> None: ...
    def i2c_rdwr(self, *i2c_msgs: i2c_msg) -> None: ...
    def close(self) -> None: ...


class ScanBusLike(SMBusLike, Protocol):
    """Also the address-only probes a bus scan needs."""

    def write_quick(self, i2c_addr: int) -> None: ...
    def read_byte(self, i2c_addr: int) -> int: ...


def bus_label(bus: BusName) -> str:
    return "i2c-emulated" if bus == "emulated" else f"i2c-{bus}"


def open_smbus(number: int) -> ScanBusLike:
    """``smbus2.SMBus(number)`` with open errors turned into driver errors naming the device."""
    from smbus2 import SMBus

    path = f"/dev/i2c-{number}"
    try:
        bus: ScanBusLike = SMBus(number)
    except FileNotFoundError:
        raise DeviceNotReady(f"{path} does not exist (I2C not enabled, or adapter not loaded?)",
                             where=bus_label(number)) from None
    except PermissionError:
        raise ConfigurationError(f"no permission to open {path} (is the user in group i2c?)",
                                 where=bus_label(number)) from None
    except OSError as exc:
        raise DeviceNotReady(f"cannot open {path}: {exc.strerror or exc}",
                             where=bus_label(number)) from None
    return bus


class _Handle:
    """The bus as drivers see it: forwards each call to the current smbus object, opening it
    (or reopening it after ``invalidate``) on the worker thread that makes the call."""

    def __init__(self, owner: AsyncI2CBus) -> None:
        self._owner = owner

    def _bus(self) -> SMBusLike:
        return self._owner._current()

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        return self._bus().read_byte_data(i2c_addr, register)

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._bus().write_byte_data(i2c_addr, register, value)

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        return self._bus().read_i2c_block_data(i2c_addr, register, length)

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int]) -> None:
        self._bus().write_i2c_block_data(i2c_addr, register, data)

    def i2c_rdwr(self, *i2c_msgs: i2c_msg) -> None:
        self._bus().i2c_rdwr(*i2c_msgs)

    def close(self) -> None:
        """Sensors never close the shared bus; the agent's exit stack does."""


class AsyncI2CBus:
    """A bus served by a single worker thread; ``run`` awaits a blocking call with a timeout."""

    def __init__(self, label: str, opener: Callable[[], SMBusLike],
                 emulated: Any = None) -> None:
        self.label = label
        self.emulated = emulated  # the emulated bus itself, for fault injection and tests
        self.handle: SMBusLike = _Handle(self)
        self._opener = opener
        self._smbus: SMBusLike | None = None
        self._stale = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.reopens = 0

    def _current(self) -> SMBusLike:
        # Runs on the worker thread only, so open/close never race with a transfer.
        if self._stale.is_set():
            self._stale.clear()
            self._drop()
            self.reopens += 1
        if self._smbus is None:
            log.debug("%s: opening", self.label)
            self._smbus = self._opener()
        return self._smbus

    def _drop(self) -> None:
        smbus, self._smbus = self._smbus, None
        if smbus is not None:
            try:
                smbus.close()
            except OSError as exc:
                log.debug("%s: close failed: %s", self.label, exc)

    def invalidate(self) -> None:
        """Close and reopen the device file before the next transfer."""
        self._stale.set()

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float, where: str) -> T:
        """Run ``fn(*args)`` on the bus worker; a call that does not return in time raises
        DeviceNotReady (the worker stays busy with it, and later calls queue behind it)."""
        if self._closed:
            raise DeviceNotReady("bus is closed (agent stopping)", where=where)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.label)
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await within(future, timeout_s)
        except TimeoutError:
            self.invalidate()
            raise BusTimeout(f"no answer within {timeout_s:g} s (bus hung?)",
                             where=where) from None

    async def open(self, timeout_s: float) -> None:
        """Open the device file now, so a missing adapter is reported at sensor open."""
        await self.run(self._current, timeout_s=timeout_s, where=self.label)

    async def aclose(self) -> None:
        """Close the device file on the worker and stop the worker. Never raises."""
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await within(loop.run_in_executor(executor, self._drop), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("%s: worker still busy after %.1f s; leaving it", self.label,
                        CLOSE_TIMEOUT_S)
        executor.shutdown(wait=False, cancel_futures=True)


def shared_bus(ctx: BuildContext, bus: BusName | None, *, where: str = "") -> AsyncI2CBus:
    """The agent's one ``AsyncI2CBus`` for ``bus``, created on first use."""
    if bus is None:
        raise ConfigurationError("no I2C bus configured (bus = N or bus = \"emulated\")",
                                 where=where)
    key = f"i2c:{bus}"
    existing = ctx.shared.get(key)
    if isinstance(existing, AsyncI2CBus):
        return existing
    if bus == "emulated":
        # Installed by the emulators (``drivers.emulated.i2c_bus``) or a test before the
        # sensors are built; the real bus code has no emulator of its own.
        raise ConfigurationError("the emulated I2C bus is not set up", where=where)
    number = int(bus)
    shared = AsyncI2CBus(bus_label(number), lambda: open_smbus(number))
    ctx.shared[key] = shared
    ctx.stack.push_async_callback(shared.aclose)
    return shared


def install_emulated_bus(ctx: BuildContext, emulated: Any) -> AsyncI2CBus:
    """Use ``emulated`` (e.g. with chips on a demo clock) as the agent's emulated bus.

    Call before building the sensors; ``build`` then attaches a chip only at addresses where
    ``emulated`` has none."""
    key = "i2c:emulated"
    if key in ctx.shared:
        raise ValueError("the emulated I2C bus is already set up for this agent")
    shared = AsyncI2CBus(emulated.label, lambda: emulated, emulated=emulated)
    ctx.shared[key] = shared
    ctx.stack.push_async_callback(shared.aclose)
    return shared
