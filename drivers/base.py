"""What every driver provides to the agent, and the errors it raises.

Exceptions::

    DriverError                  root; carries where it happened (bus/port, address, register)
    ├── DeviceNotReady           absent, NACK, port missing: retry later with backoff
    ├── ProtocolError            bad frame, checksum, unexpected reply (counted, retried)
    └── ConfigurationError       wrong chip id, unsupported option: retrying will not help

A sensor is built from its config by ``build(cfg, ctx)`` in its driver module and then run by
the agent's supervisor: ``open()``, then ``run(emit)`` until it raises or is cancelled, then
``close()``. On an exception the supervisor logs, counts, backs off and starts again.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.clock import Clock
from agent.readings import Reading

Emit = Callable[[Reading], None]


class DriverError(Exception):
    """Root of driver errors. ``where`` names the bus/port, address and register involved."""

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class DeviceNotReady(DriverError):
    """The device did not answer (absent, unplugged, NACK). Retrying later may succeed."""


class ProtocolError(DriverError):
    """The device answered with something invalid (checksum, framing, unexpected reply)."""


class ConfigurationError(DriverError):
    """The device or its settings are wrong in a way retrying will not fix (e.g. chip id)."""


@dataclass
class BuildContext:
    """What a driver's ``build`` gets besides its own config.

    ``shared`` holds per-agent resources keyed by name (e.g. one worker thread per I2C bus, the
    emulated bus with its chips), so sensors on the same bus share them. ``stack`` closes them
    when the agent stops.
    """

    clock: Clock
    stack: contextlib.AsyncExitStack
    shared: dict[str, Any] = field(default_factory=dict)


class Emulation(Protocol):
    """A stand-in device on a pty, for ``port = "emulated"``: the registry makes one with the
    driver's emulator and hands the driver its ``path`` as the port."""

    path: str

    async def start(self) -> None:
        """Start answering on ``path``; idempotent."""
        ...


class Sensor(abc.ABC):
    """A configured device that produces Readings."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        # The device at the far end of the port when it is emulated; started before opening.
        self.emulator: Emulation | None = None
        # Driver-specific counters shown in health (bad frames, CRC errors, overflows...).
        self.counters: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def reading(self, quantity: str, value: float, unit: str,
                reasons: tuple[str, ...] = ()) -> Reading:
        """A Reading stamped now; flagged suspect if the driver gives reasons."""
        return Reading(
            self.name,
            quantity,
            value,
            unit,
            self.clock.wall_ns(),
            self.clock.mono_ns(),
            "suspect" if reasons else "good",
            reasons,
        )

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Open the port or bus and configure the device. Raise DriverError on failure."""

    @abc.abstractmethod
    async def run(self, emit: Emit) -> None:
        """Produce readings through ``emit`` until cancelled; raise DriverError on failure."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the port or bus. Must not raise."""


class PolledSensor(Sensor):
    """A sensor read on a fixed period: subclasses implement ``sample``."""

    def __init__(self, name: str, clock: Clock, period_s: float) -> None:
        super().__init__(name, clock)
        self.period_s = period_s

    @abc.abstractmethod
    async def sample(self) -> Sequence[Reading]:
        """Take one reading of every quantity. Raise DriverError on failure."""

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            for r in await self.sample():
                emit(r)
            # Schedule on a fixed grid so the period does not drift with read time.
            next_t += self.period_s
            delay = next_t - loop.time()
            if delay < 0:
                next_t = loop.time()
                delay = 0
            await asyncio.sleep(delay)
