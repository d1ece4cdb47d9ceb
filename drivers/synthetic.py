"""A sensor that generates a signal, with fault injection.

Used by the demo and by tests of the runtime itself: it exercises supervision, queues and the
uplink without any hardware. Options (``[sensors.options]``):

- ``quantity`` (default ``"temperature"``), ``unit`` (default ``"degC"``)
- ``base``, ``amplitude``, ``cycle_s``: a sine around ``base``
- ``burst``: readings per period (for load tests)
- ``fail_after``: raise a DriverError after this many readings of each run (crash testing)
- faults by reading number n (0 = off): ``spike_every``/``spike_size`` (add ``spike_size`` to
  every n-th reading), ``stuck_every``/``stuck_len`` (repeat the previous value ``stuck_len``
  times from every n-th reading), ``dropout_every``/``dropout_len`` (say nothing for
  ``dropout_len`` readings from every n-th)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from agent.clock import Clock
from agent.readings import Reading
from drivers.base import BuildContext, DriverError, PolledSensor


class SyntheticSensor(PolledSensor):
    def __init__(self, name: str, clock: Clock, period_s: float, options: dict[str, Any]) -> None:
        super().__init__(name, clock, period_s)
        self.quantity = str(options.get("quantity", "temperature"))
        self.unit = str(options.get("unit", "degC"))
        self.base = float(options.get("base", 20.0))
        self.amplitude = float(options.get("amplitude", 1.0))
        self.cycle_s = float(options.get("cycle_s", 600.0))
        self.burst = int(options.get("burst", 1))
        self.fail_after = int(options.get("fail_after", 0))
        self.spike = (int(options.get("spike_every", 0)), float(options.get("spike_size", 50.0)))
        self.stuck = (int(options.get("stuck_every", 0)), int(options.get("stuck_len", 10)))
        self.dropout = (int(options.get("dropout_every", 0)), int(options.get("dropout_len", 10)))
        self._n = 0
        self._last = self.base
        self._period_ns = round(period_s * 1e9)
        self._last_wall = self._last_mono = -(1 << 62)
        self._omega = 2 * math.pi / (self.cycle_s * 1e9)  # radians per ns
        self._plain = not (self.fail_after or self.spike[0] or self.stuck[0] or self.dropout[0])

    async def open(self) -> None:
        self._n = 0

    async def sample(self) -> Sequence[Reading]:
        # A burst is the samples since the last one (at most a period), evenly spaced, as a
        # buffered ADC hands them over: one clock read per burst (this is the load generator
        # of the throughput bench), and distinct, increasing times.
        wall = self.clock.wall_ns()
        mono = self.clock.mono_ns()
        step = min(self._period_ns, mono - self._last_mono) // self.burst
        if step < 1:
            step = 1
            wall, mono = self._last_wall + self.burst, self._last_mono + self.burst
        self._last_wall, self._last_mono = wall, mono
        if self._plain:
            return self._plain_burst(wall, mono, step)
        out = []
        for i in range(self.burst):
            if self.fail_after and self._n >= self.fail_after:
                raise DriverError("injected failure", where=f"synthetic:{self.name}")
            self._n += 1
            n = self._n
            if _in_run(n, *self.dropout):
                continue
            back = (self.burst - 1 - i) * step
            value = self.base + self.amplitude * math.sin(self._omega * (mono - back))
            if _in_run(n, *self.stuck):
                value = self._last
            self._last = value
            if self.spike[0] and n % self.spike[0] == 0:
                value += self.spike[1]
            out.append(Reading(self.name, self.quantity, value, self.unit, wall - back,
                               mono - back))
        return out


    def _plain_burst(self, wall: int, mono: int, step: int) -> list[Reading]:
        """A burst without injected faults: the load generator's path, kept lean."""
        burst = self.burst
        self._n += burst
        first = (burst - 1) * step
        name, quantity, unit = self.name, self.quantity, self.unit
        base, amplitude, omega, sin = self.base, self.amplitude, self._omega, math.sin
        out = [Reading(name, quantity, base + amplitude * sin(omega * (mono - back)), unit,
                       wall - back, mono - back) for back in range(first, -1, -step)]
        self._last = out[-1].value
        return out


def _in_run(n: int, every: int, length: int) -> bool:
    """Whether reading ``n`` falls in a fault run that starts at every ``every``-th reading."""
    return every > 0 and n % every < length and n >= every


def build(cfg: Any, ctx: BuildContext) -> SyntheticSensor:
    return SyntheticSensor(cfg.name, ctx.clock, cfg.period_s, dict(cfg.options))
