"""OmniPreSense OPS243-A Doppler radar: configure on connect, count vehicles on the host.

On ``open()`` the radar is told (OPS243 API, AN-010): ``OJ`` JSON output, ``UM`` metres per
second, ``R>n``/``R<n`` the speed window, ``M>n`` the magnitude floor. Each command must be
answered by a JSON line within ``timeout_s``; a missing reply is DeviceNotReady, a reply that
contradicts the command (units still mph) is ConfigurationError.

``run()`` parses reports (``drivers.serial.ops243_reports``) and feeds speeds to the host-side
``VehicleDetector``; it emits one Reading per vehicle, ``speed_in`` or ``speed_out`` in m/s.
A radar is silent when the road is empty, so silence alone is not a fault: after ``probe_s``
without a byte the driver asks ``U?``; no answer within ``timeout_s`` is DeviceNotReady, and an
answer in other units means the radar restarted with its defaults (DeviceNotReady, so the
supervisor re-opens and reconfigures it).

Options: ``min_speed_mps`` (1.0), ``max_speed_mps`` (45.0), ``magnitude_min`` (20),
``min_duration_s`` (0.1), ``gap_s`` (0.75), ``probe_s`` (60), ``baudrate`` (19200),
``configure`` (true), ``emulator`` (table; see ``drivers.emulated.ops243``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.clock import Clock
from drivers.base import (
    BuildContext,
    ConfigurationError,
    DeviceNotReady,
    Emit,
    Sensor,
)
from drivers.serial.ops243_reports import LineParser, Reply, SpeedReport, unit_factor
from drivers.serial.port import SerialPort, option
from drivers.serial.vehicles import Vehicle, VehicleDetector

log = logging.getLogger(__name__)

BAUDRATE = 19200  # OPS243 UART default
UNITS_QUERY = "U?"


@dataclass(frozen=True)
class RadarSettings:
    min_speed_mps: float = 1.0
    max_speed_mps: float = 45.0
    magnitude_min: float = 20.0
    min_duration_s: float = 0.1
    gap_s: float = 0.75
    probe_s: float = 60.0
    configure: bool = True

    def commands(self) -> list[tuple[str, Callable[[Reply], str | None]]]:
        """The configuration sequence, each command with the check of its reply."""
        return [
            ("OJ", _any_reply),
            ("UM", _units_are_mps),
            (f"R>{self.min_speed_mps:g}", _echoes(self.min_speed_mps)),
            (f"R<{self.max_speed_mps:g}", _echoes(self.max_speed_mps)),
            (f"M>{self.magnitude_min:g}", _echoes(self.magnitude_min)),
        ]


def _any_reply(reply: Reply) -> str | None:
    return None


def _units_are_mps(reply: Reply) -> str | None:
    value = reply.get("unit*")
    if value is None:
        return None  # some firmware acknowledges without naming the unit
    if unit_factor(str(value)) != 1.0:
        return f"radar reports units {value!r}, not m/s"
    return None


def _echoes(expected: float) -> Callable[[Reply], str | None]:
    def check(reply: Reply) -> str | None:
        numbers = []
        for v in reply.fields.values():
            try:
                numbers.append(float(str(v).lstrip("<>= ")))
            except ValueError:
                continue
        if numbers and not any(abs(n - expected) < 1e-6 for n in numbers):
            return f"radar echoed {numbers}, expected {expected:g}"
        return None

    return check


class Ops243Sensor(Sensor):
    def __init__(
        self,
        name: str,
        clock: Clock,
        port: SerialPort,
        settings: RadarSettings,
        *,
        timeout_s: float,
    ) -> None:
        super().__init__(name, clock)
        self.port = port
        self.settings = settings
        self.timeout_s = timeout_s
        self.parser = LineParser(self.count)
        self.detector = self._new_detector()
        self.vehicles: int = 0

    def _new_detector(self) -> VehicleDetector:
        s = self.settings
        return VehicleDetector(
            min_speed_mps=s.min_speed_mps,
            max_speed_mps=s.max_speed_mps,
            min_duration_s=s.min_duration_s,
            gap_s=s.gap_s,
        )

    async def open(self) -> None:
        if self.emulator is not None:
            await self.emulator.start()
        await self.port.open()
        self.parser = LineParser(self.count)
        self.detector = self._new_detector()
        if self.settings.configure:
            for cmd, check in self.settings.commands():
                await self.command(cmd, check)

    async def close(self) -> None:
        await self.port.close()

    async def command(self, cmd: str, check: Callable[[Reply], str | None] = _any_reply) -> Reply:
        """Send ``cmd`` and return its JSON reply; reports arriving meanwhile are dropped."""
        await self.port.write(cmd.encode("ascii") + b"\r\n", self.timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while (remaining := deadline - loop.time()) > 0:
            for item in self.parser.feed(await self.port.read(remaining)):
                if isinstance(item, Reply):
                    problem = check(item)
                    if problem:
                        raise ConfigurationError(
                            f"{cmd}: {problem} (reply {json.dumps(item.fields)})",
                            where=self.port.where,
                        )
                    log.debug("%s: %s -> %s", self.port.where, cmd, item.fields)
                    return item
        raise DeviceNotReady(
            f"no JSON reply to {cmd!r} within {self.timeout_s:g} s", where=self.port.where
        )

    def _emit_vehicles(self, vehicles: list[Vehicle], emit: Emit) -> None:
        for v in vehicles:
            self.vehicles += 1
            self.count(f"vehicles_{v.direction}")
            emit(self.reading(v.quantity, v.speed_mps, "m/s"))

    def _handle(self, item: SpeedReport | Reply, now: float, emit: Emit) -> Reply | None:
        if isinstance(item, Reply):
            return item
        if self.settings.configure and not item.from_json:
            raise DeviceNotReady(
                "radar output is no longer JSON: it restarted with its defaults",
                where=self.port.where,
            )
        floor = self.settings.magnitude_min
        for i, speed in enumerate(item.speeds_mps):
            if i < len(item.magnitudes) and not item.magnitudes[i] >= floor:  # NaN too
                self.count("below_magnitude")
                continue
            self._emit_vehicles(self.detector.feed(now, speed), emit)
        return None

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        probe_deadline: float | None = None  # set while a units query is unanswered
        while True:
            now = loop.time()
            wake = probe_deadline if probe_deadline is not None else last_rx + self.settings.probe_s
            vehicle_deadline = self.detector.next_deadline()
            if vehicle_deadline is not None:
                wake = min(wake, vehicle_deadline)
            data = await self.port.read(max(0.0, wake - now))
            now = loop.time()
            if data:
                last_rx = now
                for item in self.parser.feed(data):
                    reply = self._handle(item, now, emit)
                    if reply is not None and probe_deadline is not None:
                        probe_deadline = None
                        problem = _units_are_mps(reply)
                        if problem:
                            raise DeviceNotReady(
                                f"{problem}: the radar restarted with its defaults",
                                where=self.port.where,
                            )
            self._emit_vehicles(self.detector.flush(now), emit)
            if probe_deadline is not None and now >= probe_deadline:
                raise DeviceNotReady(
                    f"radar silent: no reply to {UNITS_QUERY!r} within {self.timeout_s:g} s",
                    where=self.port.where,
                )
            if probe_deadline is None and now - last_rx >= self.settings.probe_s:
                await self.port.write(UNITS_QUERY.encode("ascii") + b"\r\n", self.timeout_s)
                probe_deadline = now + self.timeout_s


def settings_from(options: dict[str, Any], where: str) -> RadarSettings:
    d = RadarSettings()
    s = RadarSettings(
        min_speed_mps=option(options, "min_speed_mps", float, d.min_speed_mps, where),
        max_speed_mps=option(options, "max_speed_mps", float, d.max_speed_mps, where),
        magnitude_min=option(options, "magnitude_min", float, d.magnitude_min, where),
        min_duration_s=option(options, "min_duration_s", float, d.min_duration_s, where),
        gap_s=option(options, "gap_s", float, d.gap_s, where),
        probe_s=option(options, "probe_s", float, d.probe_s, where),
        configure=option(options, "configure", bool, d.configure, where),
    )
    if not 0 <= s.min_speed_mps < s.max_speed_mps:
        raise ConfigurationError(
            f"speed window min_speed_mps={s.min_speed_mps:g} .. max_speed_mps="
            f"{s.max_speed_mps:g} is empty", where=where)
    if s.gap_s <= 0 or s.min_duration_s < 0 or s.probe_s <= 0:
        raise ConfigurationError("gap_s and probe_s must be positive, min_duration_s >= 0",
                                 where=where)
    return s


def build(cfg: Any, ctx: BuildContext) -> Ops243Sensor:
    where = f"sensor {cfg.name}"
    options = dict(cfg.options)
    settings = settings_from(options, where)
    baudrate = option(options, "baudrate", int, BAUDRATE, where)
    port = SerialPort(str(cfg.port), baudrate=baudrate)
    return Ops243Sensor(cfg.name, ctx.clock, port, settings, timeout_s=cfg.timeout_s)
