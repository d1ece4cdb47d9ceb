"""One emulated Modbus unit: any profile's registers, filled with plausible, changing values.

Values are functions of time picked by quantity name (mains voltage near 230 V, a current
that wanders, power = V x I x PF, a frequency near 50 Hz, energy counters that only grow), then
encoded exactly as the profile says (type, word order, scale, offset, unit), so a driver that
decodes the profile right reads back what the unit holds. Registers between points read as 0.

Faults, per unit: ``silent`` (no reply: a timeout), ``vanish(s)`` (silent for a while, then
back), ``inject_exception(code, n)``, ``inject_corrupt(n)`` (replies with a bad CRC on RTU, a
malformed reply on TCP).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from drivers.modbus.decode import WORDS, bit_field, decode, encode, raw_for, unsigned
from drivers.modbus.plan import value_of
from drivers.modbus.profile import BIT_TABLES, FUNCTION, ResolvedPoint

TimeFn = Callable[[], float]
TABLE_OF = {fc: table for table, fc in FUNCTION.items()}
_LIMITS = {"u16": (0, 0xFFFF), "i16": (-0x8000, 0x7FFF), "u32": (0, 2**32 - 1),
           "i32": (-(2**31), 2**31 - 1), "u64": (0, 2**64 - 1), "i64": (-(2**63), 2**63 - 1)}


class EmulatedUnit:
    def __init__(self, unit: int, points: Sequence[ResolvedPoint], time_fn: TimeFn,
                 seed: int = 0, update_s: float = 0.5) -> None:
        self.unit = unit
        self.points = tuple(points)
        self.time_fn = time_fn
        self.update_s = update_s
        self.rng = random.Random(seed * 7919 + unit)
        self.phase = self.rng.uniform(0, 2 * math.pi)
        self.images: dict[str, dict[int, int]] = {t: {} for t in FUNCTION}
        self.held: dict[str, float] = {}
        self.silent = False
        self.exceptions: list[int] = []
        self.corrupt = 0
        self._back_at: float | None = None
        self._t0 = time_fn()
        self._last_update: float | None = None
        self._energy_base = 1000.0 + self.rng.uniform(0, 5e5)
        self.refresh(force=True)

    # -- values --------------------------------------------------------------------------

    def _value(self, q: str, t: float) -> float:
        s = math.sin(2 * math.pi * t / 300 + self.phase)
        pf = 0.95 + 0.04 * math.sin(2 * math.pi * t / 600 + self.phase)
        volts = 230.0 + 3.0 * s + self.rng.gauss(0, 0.2)
        amps = 6.0 + 4.0 * math.sin(2 * math.pi * t / 120 + self.phase)
        base = q.split("_l", maxsplit=1)[0] if "_l" in q else q
        if base.startswith("voltage"):
            return volts
        if base.startswith("current"):
            return amps
        if base.startswith("active_power"):
            return volts * amps * pf
        if base.startswith("apparent_power"):
            return volts * amps
        if base.startswith("reactive_power"):
            return volts * amps * math.sin(math.acos(pf))
        if base.startswith("power_factor"):
            return pf
        if base.startswith("phase_angle"):
            return math.degrees(math.acos(pf))
        if base.startswith("frequency"):
            return 50.0 + 0.05 * math.sin(2 * math.pi * t / 40) + self.rng.gauss(0, 0.01)
        if "energy" in base:
            # Wh, growing with the ~1.4 kW the emulated load draws.
            return self._energy_base + 1400.0 * (t - self._t0) / 3600
        if base.startswith("alarm"):
            return 0.0
        return 10.0 + 5.0 * s

    def refresh(self, force: bool = False) -> None:
        """Re-fill the registers with the values of now (at most every ``update_s``)."""
        t = self.time_fn()
        if not force and self._last_update is not None and t - self._last_update < self.update_s:
            return
        self._last_update = t
        for p in self.points:
            self.set(p, self._value(p.quantity, t))

    def set(self, p: ResolvedPoint, value: float) -> None:
        """Hold ``value`` (canonical unit) at point ``p``, as near as its encoding allows."""
        image = self.images[p.table]
        if p.table in BIT_TABLES or p.type == "bool":
            image[p.address] = 1 if value else 0
        elif p.bit is not None:
            words = [image.get(p.address + i, 0) for i in range(WORDS[p.type])]
            reg = unsigned(int(decode(words, p.type, p.order)), p.type)
            mask = ((1 << p.width) - 1) << p.bit
            field = round(value) & ((1 << p.width) - 1)
            reg = (reg & ~mask) | (field << p.bit)
            kind = "u" + p.type[1:]
            for i, w in enumerate(encode(reg, kind, p.order)):
                image[p.address + i] = w
        else:
            raw = raw_for(value, p.type, p.scale, p.offset, p.factor)
            if p.type in _LIMITS:
                lo, hi = _LIMITS[p.type]
                raw = max(lo, min(hi, int(raw)))
            for i, w in enumerate(encode(raw, p.type, p.order)):
                image[p.address + i] = w
        span = [image.get(p.address + i, 0) for i in range(p.span)]
        self.held[p.quantity] = value_of(p, span)

    def bit_value(self, p: ResolvedPoint) -> int:
        word = self.images[p.table].get(p.address, 0)
        return bit_field(word, p.bit or 0, p.width)

    # -- faults --------------------------------------------------------------------------

    def vanish(self, seconds: float | None = None) -> None:
        """Stop answering; come back after ``seconds`` (None: until ``come_back()``)."""
        self.silent = True
        self._back_at = None if seconds is None else self.time_fn() + seconds

    def come_back(self) -> None:
        self.silent = False
        self._back_at = None

    def answering(self) -> bool:
        if self.silent and self._back_at is not None and self.time_fn() >= self._back_at:
            self.come_back()
        return not self.silent

    def inject_exception(self, code: int = 0x04, count: int = 1) -> None:
        self.exceptions += [code] * count

    def inject_corrupt(self, count: int = 1) -> None:
        self.corrupt += count

    # -- requests ------------------------------------------------------------------------

    def read(self, function: int, start: int, count: int) -> tuple[int, ...] | int:
        """The values a read returns, or an exception code."""
        if self.exceptions:
            return self.exceptions.pop(0)
        table = TABLE_OF.get(function)
        if table is None:
            return 0x01
        limit = 2000 if table in BIT_TABLES else 125
        if not 1 <= count <= limit or start + count > 0x10000:
            return 0x03
        mine = [p for p in self.points if p.table == table
                and p.address < start + count and p.address + p.span > start]
        if not mine:
            return 0x02  # nothing of this device is there: illegal data address
        self.refresh()
        image = self.images[table]
        return tuple(image.get(a, 0) for a in range(start, start + count))
