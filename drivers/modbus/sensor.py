"""The ``modbus`` driver: any device described by a profile or inline points, over RTU or TCP.

Each poll reads the planned requests in turn on the shared line (or connection) and emits one
Reading per point, in canonical units. A failed request fails the poll: the supervisor counts
it and backs the sensor off, which also keeps a silent unit off a shared RS-485 line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from agent.clock import Clock
from agent.readings import Reading
from drivers.base import BuildContext, ConfigurationError, PolledSensor
from drivers.modbus.options import Spec, resolve, tcp_target
from drivers.modbus.plan import Request, decode_request, plan
from drivers.modbus.profile import ProfileError
from drivers.modbus.rtu import Count, RtuLine, frame_gap_s
from drivers.modbus.tcp import TcpLink
from drivers.serial.port import SerialPort, port_key, shared

log = logging.getLogger(__name__)

MAX_UNIT = 247  # Modbus over serial line v1.02, 2.2: 1..247 are unit addresses


class Transport(Protocol):
    where: str

    async def open(self) -> None: ...
    async def release(self) -> None: ...
    async def close(self) -> None: ...
    async def read(self, unit: int, function: int, start: int, count: int, *,
                   timeout_s: float, retries: int, on_count: Count = ...) -> tuple[int, ...]: ...


class ModbusSensor(PolledSensor):
    def __init__(self, name: str, clock: Clock, period_s: float, link: Transport, *,
                 unit: int, requests: Sequence[Request], timeout_s: float,
                 retries: int) -> None:
        super().__init__(name, clock, period_s)
        self.link = link
        self.unit = unit
        self.requests = tuple(requests)
        self.timeout_s = timeout_s
        self.retries = retries
        self.polls = 0
        self._opened = False

    async def open(self) -> None:
        if self.emulator is not None:
            await self.emulator.start()
        await self.link.open()
        self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                await self.link.release()
            except Exception:  # close must not raise
                log.debug("%s: error releasing %s", self.name, self.link.where, exc_info=True)

    async def sample(self) -> Sequence[Reading]:
        values = []
        for req in self.requests:
            words = await self.link.read(self.unit, req.function, req.start, req.count,
                                         timeout_s=self.timeout_s, retries=self.retries,
                                         on_count=self.count)
            values += decode_request(req, words)
        self.polls += 1
        return [self.reading(p.quantity, v, p.unit) for p, v in values]


def build(cfg: Any, ctx: BuildContext) -> ModbusSensor:
    where = f"sensor {cfg.name}"
    try:
        spec: Spec = resolve(dict(cfg.options))
    except ProfileError as exc:
        raise ConfigurationError(str(exc), where=where) from None
    unit = cfg.address if cfg.address is not None else 1
    if not 1 <= unit <= MAX_UNIT:
        raise ConfigurationError(f"unit id {unit} outside 1..{MAX_UNIT}", where=where)
    path = str(cfg.port)
    try:
        target = tcp_target(path)
    except ValueError as exc:
        raise ConfigurationError(str(exc), where=where) from None
    link: Transport
    if target is not None:
        host, port = target
        link = shared(ctx, f"modbus-tcp:{host}:{port}", lambda: TcpLink(host, port))
    else:
        gap = spec.options.frame_gap_ms
        gap_s = gap / 1000 if gap is not None else frame_gap_s(spec.baudrate, spec.parity,
                                                              spec.stopbits)
        link = shared(ctx, port_key(path), lambda: RtuLine(
            SerialPort(path, baudrate=spec.baudrate, parity=spec.parity,
                       stopbits=spec.stopbits), gap_s))
    if not isinstance(link, (RtuLine, TcpLink)):
        raise ConfigurationError(f"port {path} is already used by another kind of driver",
                                 where=where)
    if isinstance(link, RtuLine):
        have = (link.port.baudrate, link.port.parity, link.port.stopbits)
        want = (spec.baudrate, spec.parity, spec.stopbits)
        if have != want:
            raise ConfigurationError(
                f"port {path} runs at {have[0]} baud 8{have[1]}{have[2]} for the units already "
                f"on it; this unit asks for {want[0]} baud 8{want[1]}{want[2]} (set the "
                "`baudrate`, `parity`, `stopbits` options: every unit on a line shares them)",
                where=where)
    requests = plan(spec.points, spec.max_registers, spec.max_gap)
    return ModbusSensor(cfg.name, ctx.clock, cfg.period_s, link, unit=unit, requests=requests,
                        timeout_s=cfg.timeout_s, retries=spec.options.retries)
