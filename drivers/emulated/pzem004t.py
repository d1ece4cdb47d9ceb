"""PZEM-004T v3 meters on an emulated Modbus-RTU line (a pty).

Each meter answers at its own address (and at the general address 0xF8 when it is alone on the
line), serves input registers 0x0000..0x0009, holding registers 0x0001 (power alarm threshold,
W) and 0x0002 (address), and the reset-energy function 0x42. Requests with a bad CRC get no
reply, like the real meter.

Loads are pure functions of wall-clock time, so a test can pass its own ``time_fn``:

- ``street_lighting``: luminaires on from dusk to dawn (dusk moves with the season), dimmed to
  half power in the small hours, as many councils do;
- ``ev_charger``: charging sessions (7.4 kW, tapering at the end) that start at random but
  reproducible times, more often in the evening, with a small standby draw between;
- ``mixed``: both on one meter.

Voltage sags a little with load, frequency wanders around 50 Hz, energy integrates power over
the emulator's time. Faults: those of ``PtyDevice`` plus ``inject_exception(code)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drivers.base import ConfigurationError
from drivers.emulated.pty import PtyDevice
from drivers.serial import modbus
from drivers.serial.pzem004t import INPUT_REGISTERS, Measurement, encode_registers

TimeFn = Callable[[], float]

LAMPS = 12
LAMP_W = 55.0  # LED luminaire
LAMP_PF = 0.93
EV_POWER_W = 7400.0  # 32 A single phase
EV_PF = 0.99
EV_STANDBY_W = 6.0
EV_TAPER_S = 900.0
DEFAULT_ALARM_W = 23000
PROFILES = ("street_lighting", "ev_charger", "mixed")


def _day_fraction(t: float) -> tuple[float, float]:
    """(hour of day 0..24 UTC, season -1..1 with 1 at midsummer) at Unix time ``t``."""
    hour = (t % 86400) / 3600
    day_of_year = (t / 86400) % 365.25
    return hour, math.sin(2 * math.pi * (day_of_year - 80) / 365.25)


def street_lighting_w(t: float) -> float:
    hour, season = _day_fraction(t)
    dusk = 18.0 + 2.2 * season + 0.25  # a quarter hour after sunset, mid-latitudes
    dawn = 6.0 - 2.2 * season - 0.25
    if dawn <= hour < dusk:
        return 0.0
    dimmed = 0.0 <= hour < 5.0  # part-night dimming
    return LAMPS * LAMP_W * (0.5 if dimmed else 1.0)


def _session_start_probability(hour: int) -> float:
    if 17 <= hour <= 20:
        return 0.45
    if 7 <= hour <= 9:
        return 0.3
    if 10 <= hour <= 16:
        return 0.2
    return 0.05


@dataclass(frozen=True)
class Session:
    start: float
    duration_s: float


def ev_sessions(seed: int, hour_index: int) -> list[Session]:
    """Sessions starting in the hour ``hour_index`` (hours since the epoch), reproducibly."""
    rng = random.Random(seed * 1_000_003 + hour_index)
    if rng.random() >= _session_start_probability(hour_index % 24):
        return []
    start = hour_index * 3600 + rng.uniform(0, 3600)
    return [Session(start, rng.uniform(1800, 3 * 3600))]


def ev_charger_w(t: float, seed: int = 0) -> float:
    hour_index = int(t // 3600)
    for h in range(hour_index - 3, hour_index + 1):
        for s in ev_sessions(seed, h):
            if s.start <= t < s.start + s.duration_s:
                left = s.start + s.duration_s - t
                return EV_POWER_W * min(1.0, 0.15 + 0.85 * left / EV_TAPER_S)
    return EV_STANDBY_W


class EmulatedMeter:
    """One meter's state: its load profile and energy register."""

    def __init__(self, address: int, profile: str, time_fn: TimeFn, seed: int = 0) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown load profile {profile!r}; known: {', '.join(PROFILES)}")
        self.address = address
        self.profile = profile
        self.time_fn = time_fn
        self.seed = seed
        self.rng = random.Random(seed + address)
        self.energy_wh = 0.0
        self.alarm_threshold_w = DEFAULT_ALARM_W
        self._last_t: float | None = None
        self.override: Measurement | None = None  # fixed values, for decode tests

    def load(self, t: float) -> tuple[float, float]:
        """(active power W, apparent power VA) at ``t``."""
        p = s = 0.0
        if self.profile in ("street_lighting", "mixed"):
            w = street_lighting_w(t)
            p, s = p + w, s + w / LAMP_PF
        if self.profile in ("ev_charger", "mixed"):
            w = ev_charger_w(t, self.seed)
            pf = EV_PF if w > EV_STANDBY_W else 0.5
            p, s = p + w, s + w / pf
        return p, s

    def measure(self) -> Measurement:
        if self.override is not None:
            return self.override
        t = self.time_fn()
        power, apparent = self.load(t)
        if self._last_t is not None and t > self._last_t:
            self.energy_wh += power * (t - self._last_t) / 3600
        self._last_t = t
        hour, _ = _day_fraction(t)
        voltage = 231.0 + 2.0 * math.sin(2 * math.pi * hour / 24) - power * 2e-4
        voltage += self.rng.gauss(0, 0.3)
        current = apparent / voltage if voltage > 0 else 0.0
        pf = power / apparent if apparent > 0 else 0.0
        return Measurement(
            voltage_v=round(voltage, 1),
            current_a=round(current, 3),
            power_w=round(power, 1),
            energy_wh=float(int(self.energy_wh)),
            frequency_hz=round(50.0 + self.rng.gauss(0, 0.02), 1),
            power_factor=round(min(pf, 1.0), 2),
            alarm=power > self.alarm_threshold_w,
        )

    def holding(self, register: int) -> int | None:
        return {1: self.alarm_threshold_w, 2: self.address}.get(register)


class PzemLine(PtyDevice):
    """A Modbus line with any number of emulated meters on it."""

    def __init__(self, name: str = "pzem004t", *, time_fn: TimeFn = time.time,
                 link_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(name, link_dir=link_dir, seed=seed)
        self.time_fn = time_fn
        self.seed = seed
        self.meters: dict[int, EmulatedMeter] = {}
        self.requests_seen = 0
        self.bad_requests = 0
        self._exceptions: list[int] = []
        self._misdirected: list[str] = []  # replies to come from another address or function
        self._parser = modbus.RequestParser(self._count)
        self._queue: asyncio.Queue[modbus.Frame] = asyncio.Queue(maxsize=32)

    def _count(self, key: str, n: int) -> None:
        if key == "crc_errors":
            self.bad_requests += n

    def add_meter(self, address: int, profile: str = "mixed") -> EmulatedMeter:
        meter = EmulatedMeter(address, profile, self.time_fn, self.seed)
        self.meters[address] = meter
        return meter

    def inject_exception(self, code: int = 0x04, count: int = 1) -> None:
        """The next ``count`` requests get exception replies with ``code``."""
        self._exceptions += [code] * count

    def inject_misdirected(self, kind: str, count: int = 1) -> None:
        """The next ``count`` replies are well-formed (good CRC) but carry another address
        (``wrong_address``, a second meter answering) or function (``wrong_function``)."""
        if kind not in ("wrong_address", "wrong_function"):
            raise ValueError(f"unknown fault {kind!r}: expected wrong_address or wrong_function")
        self._misdirected += [kind] * count

    def _misdirect(self, frame: bytes) -> bytes:
        kind = self._misdirected.pop(0)
        body = bytearray(frame[:-2])
        if kind == "wrong_address":
            body[0] = body[0] % 0xF7 + 1
        else:
            body[1] = modbus.FC_READ_HOLDING if body[1] != modbus.FC_READ_HOLDING \
                else modbus.FC_READ_INPUT
        return modbus.with_crc(bytes(body))

    def received(self, data: bytes) -> None:
        for frame in self._parser.feed(data):
            self.requests_seen += 1
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(frame)

    def _meter_for(self, address: int) -> EmulatedMeter | None:
        if address == modbus.BROADCAST_GENERAL and len(self.meters) == 1:
            return next(iter(self.meters.values()))
        return self.meters.get(address)

    def reply(self, request: modbus.Frame) -> bytes | None:
        """The meter's answer to one request, or None when no meter has that address."""
        meter = self._meter_for(request.address)
        if meter is None:
            return None
        fc = request.function
        addr = meter.address

        def error(code: int) -> bytes:
            return modbus.with_crc(bytes((addr, fc | modbus.EXCEPTION_FLAG, code)))

        if self._exceptions:
            return error(self._exceptions.pop(0))
        if fc == modbus.FC_PZEM_RESET_ENERGY:
            meter.energy_wh = 0.0
            return modbus.with_crc(bytes((addr, fc)))
        if fc in (modbus.FC_READ_INPUT, modbus.FC_READ_HOLDING):
            start = int.from_bytes(request.data[0:2], "big")
            count = int.from_bytes(request.data[2:4], "big")
            if fc == modbus.FC_READ_INPUT:
                regs = encode_registers(meter.measure())
                if count < 1 or start + count > INPUT_REGISTERS:
                    return error(0x02)
                values = regs[start:start + count]
            else:
                held = [meter.holding(r) for r in range(start, start + count)]
                if count < 1 or any(v is None for v in held):
                    return error(0x02)
                values = [v or 0 for v in held]
            body = bytes((addr, fc, 2 * len(values)))
            body += b"".join(v.to_bytes(2, "big") for v in values)
            return modbus.with_crc(body)
        if fc == modbus.FC_WRITE_SINGLE:
            register = int.from_bytes(request.data[0:2], "big")
            value = int.from_bytes(request.data[2:4], "big")
            if register == 1:
                meter.alarm_threshold_w = value
            elif register == 2 and 0x01 <= value <= 0xF7:
                self.meters.pop(meter.address, None)
                meter.address = value
                self.meters[value] = meter
            else:
                return error(0x03)
            return modbus.with_crc(bytes((addr, fc)) + request.data)
        return error(0x01)

    async def run(self) -> None:
        while True:
            request = await self._queue.get()
            answer = self.reply(request)
            if answer is not None and self._misdirected:
                answer = self._misdirect(answer)
            if answer is not None:
                await self.send(answer)


def emulate(cfg: Any, ctx: Any) -> PzemLine:
    """The emulated line for a ``port = "emulated"`` sensor, shared by every meter on it.

    ``[sensors.options.emulator]``: ``bus`` (line name, default "default"), ``profile``
    (street_lighting, ev_charger, mixed; default mixed), ``seed``, ``link_dir``.
    """
    from drivers.serial.port import shared

    emu_opts: dict[str, Any] = dict(cfg.options.get("emulator", {}))
    bus_name = str(emu_opts.get("bus", "default"))
    clock = ctx.clock

    def make() -> PzemLine:
        return PzemLine(
            f"pzem004t-{bus_name}",
            time_fn=lambda: clock.wall_ns() / 1e9,
            link_dir=emu_opts.get("link_dir"),
            seed=int(emu_opts.get("seed", 0)),
        )

    address = cfg.address if cfg.address is not None else 0x01
    try:
        line = shared(ctx, f"emulated:pzem004t:{bus_name}", make)
        if address not in line.meters:
            line.add_meter(address, str(emu_opts.get("profile", "mixed")))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc), where=f"sensor {cfg.name} emulator") from None
    return line
