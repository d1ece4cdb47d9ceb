"""A PMS5003 particulate sensor on a pty: streams 32-byte frames, obeys mode/sleep commands.

Concentrations follow wall-clock time (``time_fn``): a background level with morning and
evening traffic peaks, a slow random walk, and now and then a smoke episode. Setting ``fixed``
to a ``PmsFrame`` sends exactly that frame instead (for decode tests).

Commands (``42 4D cmd hi lo sum``): 0xE1 mode (0 passive, 1 active), 0xE2 read (passive mode),
0xE4 sleep (0) / wake (1). Mode and sleep commands are acknowledged with a length-4 frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
from collections.abc import Callable
from typing import Any

from agent.aio import within
from drivers.base import ConfigurationError
from drivers.emulated.pty import PtyDevice
from drivers.serial.pms5003 import (
    ACK_LENGTH,
    CMD_READ_PASSIVE,
    CMD_SET_MODE,
    CMD_SLEEP,
    HEADER,
    PmsFrame,
)

TimeFn = Callable[[], float]
COMMAND_BYTES = 7


def background_pm2_5(t: float) -> float:
    """Urban background PM2.5 (ug/m3) with traffic peaks at 08:00 and 18:00 UTC."""
    hour = (t % 86400) / 3600
    peaks = sum(math.exp(-((hour - h) ** 2) / 2.0) for h in (8.0, 18.0))
    return 8.0 + 10.0 * peaks


def frame_for(pm2_5: float) -> PmsFrame:
    """A plausible frame around a PM2.5 level: size fractions and counts scale with it."""
    pm1 = 0.7 * pm2_5
    pm10 = 1.35 * pm2_5

    def cf1(x: float) -> int:  # CF=1 reads higher than atmospheric above ~30 ug/m3
        return round(x if x < 30 else 30 + (x - 30) * 1.5)

    counts = [150.0, 45.0, 9.0, 1.0, 0.3, 0.1]
    particles = tuple(round(pm2_5 * c) for c in counts)
    return PmsFrame(
        cf1(pm1), cf1(pm2_5), cf1(pm10), round(pm1), round(pm2_5), round(pm10),
        particles,  # type: ignore[arg-type]
    )


class Pms5003Emulator(PtyDevice):
    def __init__(self, name: str = "pms5003", *, time_fn: TimeFn = time.time,
                 interval_s: float = 1.0, link_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(name, link_dir=link_dir, seed=seed)
        self.time_fn = time_fn
        self.interval_s = interval_s
        self.active = True
        self.asleep = False
        self.fixed: PmsFrame | None = None
        self.commands_seen: list[tuple[int, int]] = []
        self._walk = 0.0
        self._episode_until = 0.0
        self._inbox = bytearray()
        self._wake = asyncio.Event()
        self._pending_reads = 0

    def level(self) -> float:
        t = self.time_fn()
        self._walk = max(-5.0, min(5.0, self._walk + self.rng.gauss(0, 0.3)))
        if t >= self._episode_until and self.rng.random() < 1 / 3600:
            self._episode_until = t + self.rng.uniform(300, 1800)
        smoke = 60.0 if t < self._episode_until else 0.0
        return max(0.0, background_pm2_5(t) + self._walk + smoke)

    def next_frame(self) -> bytes:
        return (self.fixed or frame_for(self.level())).to_bytes()

    def corrupt_frame(self, frame: bytes) -> bytes:
        return frame[:-2] + struct.pack(">H", (int.from_bytes(frame[-2:], "big") + 1) & 0xFFFF)

    def received(self, data: bytes) -> None:
        self._inbox += data
        del self._inbox[:-64]  # a command is 7 bytes; stale input is not worth keeping
        while len(self._inbox) >= COMMAND_BYTES:
            start = self._inbox.find(HEADER)
            if start < 0:
                del self._inbox[:-1]
                return
            del self._inbox[:start]
            if len(self._inbox) < COMMAND_BYTES:
                return
            raw = bytes(self._inbox[:COMMAND_BYTES])
            if sum(raw[:5]) & 0xFFFF != int.from_bytes(raw[5:], "big"):
                del self._inbox[0]
                continue
            del self._inbox[:COMMAND_BYTES]
            self._command(raw[2], int.from_bytes(raw[3:5], "big"))

    def _ack(self, cmd: int, data: int) -> None:
        if self.faults.silent:
            return
        body = HEADER + struct.pack(">HBB", ACK_LENGTH, cmd, data & 0xFF)
        self.write_raw(body + struct.pack(">H", sum(body) & 0xFFFF))

    def _command(self, cmd: int, data: int) -> None:
        self.commands_seen.append((cmd, data))
        if cmd == CMD_SET_MODE:
            self.active = bool(data)
            self._ack(cmd, data)
        elif cmd == CMD_SLEEP:
            self.asleep = not data
            self._ack(cmd, data)
        elif cmd == CMD_READ_PASSIVE and not self.active:
            self._pending_reads += 1
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            if not (self._pending_reads and not self.active):
                timeout = max(0.0, next_t - loop.time()) if self.active else None
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await within(self._wake.wait(), timeout)
            if self.asleep:
                self._pending_reads = 0
                next_t = loop.time() + self.interval_s
                continue
            if self.active and loop.time() >= next_t:
                next_t += self.interval_s
                next_t = max(next_t, loop.time())
                await self.send(self.next_frame())
            while self._pending_reads and not self.active:
                self._pending_reads -= 1
                await self.send(self.next_frame())


def emulate(cfg: Any, ctx: Any) -> Pms5003Emulator:
    """The emulator for a ``port = "emulated"`` sensor.

    ``[sensors.options.emulator]``: ``interval_s`` (default 1.0), ``seed``, ``link_dir``.
    """
    from drivers.serial.port import shared

    emu_opts: dict[str, Any] = dict(cfg.options.get("emulator", {}))
    clock = ctx.clock

    def make() -> Pms5003Emulator:
        return Pms5003Emulator(
            f"pms5003-{cfg.name}",
            time_fn=lambda: clock.wall_ns() / 1e9,
            interval_s=float(emu_opts.get("interval_s", 1.0)),
            link_dir=emu_opts.get("link_dir"),
            seed=int(emu_opts.get("seed", 0)),
        )

    try:
        return shared(ctx, f"emulated:pms5003:{cfg.name}", make)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc), where=f"sensor {cfg.name} emulator") from None
