"""What the three I2C sensors share: bus calls with a timeout, bounded status polls, options.

A sensor keeps no state about the device across ``close()``/``open()``: ``open`` probes and
configures the chip from scratch, so the supervisor's retry brings back a device that was
unplugged, power-cycled or reset by a brown-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from agent.clock import Clock
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady, PolledSensor
from drivers.i2c.bus import AsyncI2CBus, BusTimeout, shared_bus
from drivers.i2c.regio import I2CBusFault, I2CNoAck, hex8

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def bus_for(cfg: Any, ctx: BuildContext, default_address: int) -> tuple[AsyncI2CBus, int]:
    """The shared bus and address of a configured chip (``address`` unset: the default)."""
    address = default_address if cfg.address is None else int(cfg.address)
    return shared_bus(ctx, cfg.bus, where=f"sensor {cfg.name!r}"), address


def parse_options(model: type[M], options: Mapping[str, Any], *, sensor: str) -> M:
    """Validate ``options`` into ``model``; every problem is named by its key path."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            path = ".".join(str(p) for p in e["loc"])
            msg = str(e["msg"]).removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown option"
            problems.append(f"options.{path}: {msg}" if path else f"options: {msg}")
        raise ConfigurationError("; ".join(problems), where=f"sensor {sensor!r}") from None


class I2CSensor(PolledSensor):
    """A polled sensor at ``address`` on a shared ``AsyncI2CBus``."""

    def __init__(self, name: str, clock: Clock, period_s: float, *, bus: AsyncI2CBus,
                 address: int, timeout_s: float) -> None:
        super().__init__(name, clock, period_s)
        self.bus = bus
        self.address = address
        self.timeout_s = timeout_s

    @property
    def where(self) -> str:
        return f"{self.bus.label} {hex8(self.address)}"

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking register call on the bus worker, counting failures by kind."""
        try:
            return await self.bus.run(fn, *args, timeout_s=self.timeout_s, where=self.where)
        except I2CNoAck:
            self.count("nack")
            raise
        except I2CBusFault:
            self.count("bus_fault")
            self.bus.invalidate()
            raise
        except BusTimeout:
            self.count("timeout")
            raise

    async def poll(self, done: Callable[[], bool], *, first_wait_s: float, interval_s: float,
                   attempts: int, what: str) -> int:
        """Wait ``first_wait_s``, then check ``done`` (a register read on the worker) up to
        ``attempts`` times ``interval_s`` apart. Bounded by count, so the wait never ends
        early however the host schedules. Returns the number of checks made."""
        await asyncio.sleep(first_wait_s)
        for n in range(1, attempts + 1):
            if await self.io(done):
                return n
            if n < attempts:
                await asyncio.sleep(interval_s)
        self.count("not_ready")
        waited = first_wait_s + (attempts - 1) * interval_s
        raise DeviceNotReady(f"{what} not done after {waited * 1000:.1f} ms", where=self.where)

    async def close(self) -> None:
        """The bus is shared and closed by the agent; nothing per sensor to release."""
