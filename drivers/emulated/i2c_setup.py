"""The agent's emulated I2C bus: created on first use, with chips attached for ``bus = "emulated"``.

The registry calls each I2C emulator's ``emulate(cfg, ctx)`` before building a sensor on the
emulated bus; that puts a chip at the sensor's address unless one is there already (a test or
the demo may attach its own first, e.g. on a demo clock). The real bus code in
``drivers.i2c.bus`` then finds the bus installed and never learns it is emulated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drivers.base import BuildContext
from drivers.emulated.i2c_bus import EmulatedChip, EmulatedI2CBus, TimeFn
from drivers.i2c.bus import AsyncI2CBus, bus_label, install_emulated_bus

ChipFactory = Callable[[TimeFn, TimeFn], EmulatedChip]


def emulated_bus(ctx: BuildContext) -> EmulatedI2CBus:
    """The agent's emulated bus (installed on first use), for attaching chips and faults."""
    shared = ctx.shared.get("i2c:emulated")
    if not isinstance(shared, AsyncI2CBus):
        shared = install_emulated_bus(ctx, EmulatedI2CBus(bus_label("emulated")))
    emulated = shared.emulated
    if not isinstance(emulated, EmulatedI2CBus):
        raise TypeError(f"the emulated bus of this agent is a {type(emulated).__name__}")
    return emulated


def attach(cfg: Any, ctx: BuildContext, default_address: int, chip: ChipFactory) -> None:
    """Put ``chip(mono, wall)`` at the sensor's address unless a chip is there already; the
    chip is timed by the agent's clock (seconds, monotonic and wall)."""
    address = default_address if cfg.address is None else int(cfg.address)
    bus = emulated_bus(ctx)
    if bus.chip(address) is None:
        bus.attach(address, chip(lambda: ctx.clock.mono_ns() / 1e9,
                                 lambda: ctx.clock.wall_ns() / 1e9))
