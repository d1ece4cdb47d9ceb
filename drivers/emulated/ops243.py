"""An OPS243-A Doppler radar on a pty: answers commands, reports the speeds of passing traffic.

Like a factory-fresh unit it starts with plain-number output in mph; ``OJ`` switches to JSON,
``UM``/``UK``/``US``/``UF``/``UC`` set units, ``R>n``/``R<n`` the reported speed window and
``M>n`` the magnitude floor (in the current units), ``U?`` asks the units, ``??`` the product.
Every command is answered with one JSON line.

Traffic comes from ``TrafficModel``: flow follows the time of day of ``time_fn`` (morning and
evening peaks, quiet nights) and now and then a stretch of congestion (dense, slow, long
passes). A vehicle's reported speed follows the Doppler cosine as it closes on the radar, with
a little noise. ``script([Pass(...)])`` plays exact passes for tests (with ``traffic=False``
nothing else is reported).

``variant`` picks the JSON dialect of the reports, as firmware versions differ:
``json`` ({"speed":"-1.23"} + magnitude), ``json_units`` (unit key, numbers not strings),
``json_list`` (capitalised keys, lists of targets in one line), ``direction`` (unsigned speed
plus a direction key). Faults: those of ``PtyDevice``, plus ``mute_replies`` (commands are
ignored), ``fixed_units`` (the unit stays put whatever is asked) and ``restart()`` (back to
factory settings, as after a power cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.aio import within
from drivers.base import ConfigurationError
from drivers.emulated.pty import PtyDevice

TimeFn = Callable[[], float]

UNITS = {"UM": ("mps", 1.0), "UK": ("kmph", 3.6), "US": ("mph", 1 / 0.44704),
         "UF": ("fps", 1 / 0.3048), "UC": ("cmps", 100.0)}
UNIT_NAMES = {"mps": "m-per-sec", "kmph": "km-per-hr", "mph": "mph", "fps": "ft-per-sec",
              "cmps": "cm-per-sec"}
VARIANTS = ("json", "json_units", "json_list", "direction")
RANGE_M = 25.0  # distance over which a car is seen
LATERAL_M = 3.5  # offset of the lane from the beam axis
MAX_LINE = 64


@dataclass(frozen=True)
class Pass:
    """One vehicle seen by the radar. ``start_s`` is an offset from when it is scripted (or an
    absolute loop time once scheduled)."""

    direction: int  # +1 approaching (inbound), -1 receding (outbound)
    speed_mps: float
    duration_s: float
    start_s: float = 0.0
    magnitude: float = 80.0
    noise_mps: float = 0.0
    cosine: bool = False  # follow the Doppler cosine (traffic) or stay at speed (scripts)
    range_m: float = RANGE_M

    def speed_at(self, tau: float, rng: random.Random) -> float:
        v = self.speed_mps
        if self.cosine:
            frac = min(max(tau / self.duration_s, 0.0), 1.0)
            # Inbound closes from RANGE_M to 0; outbound opens from 0 to RANGE_M.
            d = self.range_m * (1 - frac) if self.direction > 0 else self.range_m * frac
            v *= d / math.hypot(d, LATERAL_M) if d > 0 else 0.0
        if self.noise_mps:
            v += rng.gauss(0, self.noise_mps)
        return self.direction * max(v, 0.0)


@dataclass
class TrafficModel:
    """Vehicle arrivals as a function of wall-clock time; reproducible from ``seed``."""

    seed: int = 0
    scale: float = 1.0  # multiplies the flow
    range_m: float = RANGE_M  # how far along the road the radar sees a car
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @staticmethod
    def hour(t: float) -> float:
        return (t % 86400) / 3600

    def flow_veh_h(self, t: float) -> float:
        """Two-way flow (vehicles/hour) at Unix time ``t``: peaks at 08:00 and 17:30."""
        h = self.hour(t)
        peaks = 700 * math.exp(-((h - 8.0) ** 2) / 1.5) + 800 * math.exp(-((h - 17.5) ** 2) / 2.0)
        daytime = 350 * max(0.0, math.sin(math.pi * (h - 6.0) / 16.0)) if 6 <= h <= 22 else 0.0
        flow = 25 + daytime + peaks
        return flow * self.scale * (1.3 if self.congested(t) else 1.0)

    def congested(self, t: float) -> bool:
        """Congestion comes in 15-minute blocks, likelier in the peaks."""
        block = int(t // 900)
        h = self.hour(block * 900.0)
        p = 0.35 if 7 <= h < 9.5 or 16.5 <= h < 19 else 0.03
        return random.Random(self.seed * 1_000_003 + block).random() < p

    def vehicle(self, t: float) -> Pass:
        rng = self.rng
        h = self.hour(t)
        inbound_share = 0.65 if 6 <= h < 12 else 0.4  # into town in the morning
        direction = 1 if rng.random() < inbound_share else -1
        if self.congested(t):
            speed = min(max(rng.gauss(3.0, 1.0), 1.2), 6.0)
        else:
            speed = min(max(rng.gauss(13.5, 2.2), 6.0), 25.0)
        return Pass(direction, speed, self.range_m / speed, magnitude=rng.uniform(40, 300),
                    noise_mps=0.05, cosine=True, range_m=self.range_m)

    def next_gap_s(self, t: float) -> float:
        """Seconds to the next arrival from ``t`` (exponential at the current flow)."""
        return self.rng.expovariate(max(self.flow_veh_h(t), 1e-3) / 3600)

    def arrivals(self, t0: float, t1: float) -> list[tuple[float, Pass]]:
        """Every arrival in [t0, t1) as (time, pass): for simulating a day without a pty."""
        out: list[tuple[float, Pass]] = []
        t = t0
        while True:
            t += self.next_gap_s(t)
            if t >= t1:
                return out
            out.append((t, self.vehicle(t)))


class Ops243Emulator(PtyDevice):
    def __init__(
        self,
        name: str = "ops243",
        *,
        time_fn: TimeFn = time.time,
        traffic: bool = True,
        variant: str = "json",
        report_interval_s: float = 0.05,
        traffic_scale: float = 1.0,
        range_m: float = RANGE_M,
        link_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown report variant {variant!r}; known: {', '.join(VARIANTS)}")
        super().__init__(name, link_dir=link_dir, seed=seed)
        self.time_fn = time_fn
        self.traffic = traffic
        self.variant = variant
        self.report_interval_s = report_interval_s
        self.model = TrafficModel(seed, traffic_scale, range_m)
        self.mute_replies = False
        self.fixed_units: str | None = None
        self.commands_seen: list[str] = []
        self.passes_started = 0
        self._inbox = bytearray()
        self._active: list[Pass] = []  # start_s in loop time
        self._replies: list[bytes] = []  # answered by the device loop, through the faults
        self._wake = asyncio.Event()
        self.restart()

    def restart(self) -> None:
        """Factory settings, as after a power cut."""
        self.json = False
        self.units = "mph"
        self.min_speed = 0.0  # in current units
        self.max_speed = math.inf
        self.magnitude_min = 0.0

    # -- commands -------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        self._inbox += data
        while True:
            ends = [i for i in (self._inbox.find(b"\r"), self._inbox.find(b"\n")) if i >= 0]
            if not ends:
                break
            end = min(ends)
            line = self._inbox[:end].decode("ascii", errors="replace").strip()
            del self._inbox[: end + 1]
            if line:
                self.commands_seen.append(line)
                reply = self.command(line)
                if reply is not None and not self.mute_replies and len(self._replies) < 16:
                    self._replies.append(json.dumps(reply, separators=(",", ":")).encode())
                    self._wake.set()
        if len(self._inbox) > MAX_LINE:
            del self._inbox[:-MAX_LINE]

    def _units_reply(self) -> dict[str, Any]:
        return {"Units": UNIT_NAMES[self.units]}

    def command(self, cmd: str) -> dict[str, Any] | None:
        """Apply one command; its JSON reply."""
        if cmd == "OJ":
            self.json = True
            return {"OutputFormat": "JSON"}
        if cmd == "Oj":
            self.json = False
            return {"OutputFormat": "plain"}
        if cmd in UNITS:
            if self.fixed_units is None:
                self.units = UNITS[cmd][0]
            return self._units_reply()
        if cmd == "U?":
            return self._units_reply()
        if cmd == "??":
            return {"Product": "OPS243-A", "Version": "emulated"}
        for prefix, attr, key in (("R>", "min_speed", "MinimumSpeed"),
                                  ("R<", "max_speed", "MaximumSpeed"),
                                  ("M>", "magnitude_min", "MagnitudeMinimum")):
            if cmd.startswith(prefix):
                try:
                    value = float(cmd[2:])
                except ValueError:
                    return {"error": f"bad value in {cmd}"}
                setattr(self, attr, value)
                return {key: value}
        return {"error": f"unknown command {cmd}"}

    # -- traffic --------------------------------------------------------------------------

    def script(self, passes: list[Pass]) -> None:
        """Play these passes, each ``start_s`` after now."""
        now = asyncio.get_running_loop().time()
        for p in passes:
            self._active.append(self._scheduled(p, now + p.start_s))
        self._wake.set()

    def _format(self, speeds: list[tuple[float, float]]) -> list[bytes]:
        """Report lines for (speed in current units, magnitude) pairs."""
        if not self.json:
            return [f"{s:.2f}".encode() for s, _ in speeds]
        v = self.variant
        if v == "json_list":
            obj: dict[str, Any] = {"unit": self.units, "Speed": [round(s, 2) for s, _ in speeds],
                                   "Magnitude": [round(m) for _, m in speeds]}
            return [json.dumps(obj, separators=(",", ":")).encode()]
        lines = []
        for s, m in speeds:
            if v == "json":
                obj = {"magnitude": f"{m:.0f}", "speed": f"{s:.2f}"}
            elif v == "json_units":
                obj = {"unit": self.units, "magnitude": round(m), "speed": round(s, 2)}
            else:
                obj = {"speed": f"{abs(s):.2f}", "direction": "inbound" if s > 0 else "outbound"}
            lines.append(json.dumps(obj, separators=(",", ":")).encode())
        return lines

    def reports_at(self, now: float) -> list[bytes]:
        """The report lines for loop time ``now``; drops passes that are over."""
        factor = next(f for code, f in UNITS.values() if code == self.units)
        speeds = []
        still = []
        for p in self._active:
            tau = now - p.start_s
            if tau > p.duration_s:
                continue
            still.append(p)
            if tau < 0:
                continue
            s = p.speed_at(tau, self.rng) * factor
            if abs(s) < self.min_speed or abs(s) > self.max_speed or s == 0:
                continue
            if p.magnitude < self.magnitude_min:
                continue
            speeds.append((s, p.magnitude))
        self._active = still
        return self._format(speeds) if speeds else []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_arrival = loop.time() + self.model.next_gap_s(self.time_fn())
        next_report = loop.time()
        while True:
            while self._replies:
                await self.send(self._replies.pop(0) + b"\r\n")
            now = loop.time()
            if self.traffic and now >= next_arrival:
                self._active.append(self._scheduled(self.model.vehicle(self.time_fn()), now))
                self.passes_started += 1
                next_arrival = now + self.model.next_gap_s(self.time_fn())
            if now >= next_report:
                next_report = max(next_report + self.report_interval_s, now)
                for line in self.reports_at(now):
                    await self.send(line + b"\r\n")
            if self._active:
                wait: float | None = max(0.0, next_report - loop.time())
            elif self.traffic:
                wait = min(max(0.0, next_arrival - loop.time()), 60.0)
            else:
                wait = None
            if self._replies:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await within(self._wake.wait(), wait)

    @staticmethod
    def _scheduled(p: Pass, start: float) -> Pass:
        return dataclasses.replace(p, start_s=start)

    def corrupt_frame(self, frame: bytes) -> bytes:
        """A report whose number is mangled (the line has no checksum to fail)."""
        return frame.replace(b".", b"..", 1) if b"." in frame else b"#" + frame


def emulate(cfg: Any, ctx: Any) -> Ops243Emulator:
    """The emulator for a ``port = "emulated"`` radar.

    ``[sensors.options.emulator]``: ``traffic`` (default true), ``variant`` (json,
    json_units, json_list, direction), ``traffic_scale`` (1.0), ``range_m`` (25),
    ``report_interval_s`` (0.05),
    ``seed``, ``link_dir``.
    """
    from drivers.serial.port import shared

    emu_opts: dict[str, Any] = dict(cfg.options.get("emulator", {}))
    clock = ctx.clock

    def make() -> Ops243Emulator:
        return Ops243Emulator(
            f"ops243-{cfg.name}",
            time_fn=lambda: clock.wall_ns() / 1e9,
            traffic=bool(emu_opts.get("traffic", True)),
            variant=str(emu_opts.get("variant", "json")),
            report_interval_s=float(emu_opts.get("report_interval_s", 0.05)),
            traffic_scale=float(emu_opts.get("traffic_scale", 1.0)),
            range_m=float(emu_opts.get("range_m", RANGE_M)),
            link_dir=emu_opts.get("link_dir"),
            seed=int(emu_opts.get("seed", 0)),
        )

    try:
        return shared(ctx, f"emulated:ops243:{cfg.name}", make)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc), where=f"sensor {cfg.name} emulator") from None
