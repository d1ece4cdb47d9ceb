"""OPS243-A output lines: speed reports and command replies, parsed defensively. No I/O.

The radar writes one line per report. What a line looks like depends on the firmware version
and on the output switches (``OJ`` JSON, ``OU`` units, ``OM`` magnitude, ``OT`` time), e.g.::

    1.23                                       plain number, current units
    "mps",-1.23                                with units
    {"speed":"-1.23"}                          JSON, value as a string
    {"unit":"mps","magnitude":"68","speed":-1.23}
    {"time":"812.3","Speed":[2.1,-0.9],"Magnitude":[60,31]}   several targets
    {"speed":"1.2","direction":"inbound"}      unsigned speed with a direction
    {"Units":"m-per-sec"}                      a reply to a command (no speed in it)

Keys are matched case-insensitively, numbers may be strings, values may be lists. Speed is
signed: + approaching (inbound), - receding (outbound). Everything is converted to m/s. A line
that is none of these is counted and dropped; a JSON object preceded by garbage on the same
line is still found (the radar never nests objects in a report).

The radar speaks ASCII in lines of ~120 bytes: a line longer than ``MAX_LINE_BYTES`` is dropped
unread (``overlong_lines``), and bytes >= 0x80 are noise (``non_ascii``): tolerated before a
JSON object, never inside what is read. JSON is read with
``agent.jsontext`` (no NaN or Infinity, no number too large for a float, bounded nesting), and
every number must be finite: a speed or magnitude that is not is a bad line, never a value.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json

log = logging.getLogger(__name__)

Count = Callable[[str, int], None]

MAX_LINE_BYTES = 512  # longest report is ~120 bytes (several targets with magnitudes)
KEEP_ON_OVERFLOW = 256
PLAUSIBLE_MPS = 150.0  # far above road speeds: anything faster is a corrupted number

UNIT_FACTORS = {
    "mps": 1.0, "m/s": 1.0, "m-per-sec": 1.0, "meters-per-second": 1.0, "um": 1.0,
    "kmph": 1 / 3.6, "kph": 1 / 3.6, "km/h": 1 / 3.6, "kmh": 1 / 3.6, "km-per-hr": 1 / 3.6,
    "uk": 1 / 3.6,
    "mph": 0.44704, "mi/h": 0.44704, "us": 0.44704,
    "fps": 0.3048, "ft/s": 0.3048, "uf": 0.3048,
    "cmps": 0.01, "cm/s": 0.01, "uc": 0.01,
}
INBOUND = {"inbound", "in", "approaching", "toward", "towards", "+"}
OUTBOUND = {"outbound", "out", "receding", "away", "-"}

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def unit_factor(text: str) -> float | None:
    """m/s per unit of ``text``, or None if it is not a speed unit."""
    return UNIT_FACTORS.get(text.strip().strip('"').lower())


@dataclass(frozen=True, slots=True)
class SpeedReport:
    speeds_mps: tuple[float, ...]
    magnitudes: tuple[float, ...] = ()
    device_time_s: float | None = None
    from_json: bool = True


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON object that is not a speed report: the answer to a command."""

    fields: dict[str, Any] = field(default_factory=dict)

    def get(self, *names: str) -> Any:
        """The value of the first key whose lower-cased name is in ``names`` (or contains one
        of them when the name ends with ``*``)."""
        for key, value in self.fields.items():
            k = key.lower()
            for name in names:
                if k == name or (name.endswith("*") and name[:-1] in k):
                    return value
        return None


Item = SpeedReport | Reply


def _number(value: Any) -> float | None:
    """A finite number from an int, float or numeric string; None for anything else."""
    if isinstance(value, bool):
        return None
    numeric = isinstance(value, (int, float)) or (
        isinstance(value, str) and len(value) <= 64 and _NUMBER.match(value.strip()) is not None)
    if not numeric:
        return None
    try:
        out = float(value)
    except (OverflowError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _numbers(value: Any) -> list[float] | None:
    values = value if isinstance(value, list) else [value]
    out = [_number(v) for v in values]
    if not out or any(v is None for v in out):
        return None
    return [v for v in out if v is not None]


class LineParser:
    """Splits the byte stream into lines and parses each; bounded, never raises."""

    cap = MAX_LINE_BYTES

    def __init__(self, count: Count | None = None, unit_factor_mps: float = 1.0) -> None:
        self.buffer = bytearray()
        self.unit_factor_mps = unit_factor_mps  # for lines that do not name their unit
        self._count = count or _noop_count

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        buf = self.buffer
        buf += data
        start = 0
        while True:
            nl = _line_end(buf, start)
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if len(line) > self.cap:
                self._count("overlong_lines", 1)
                log.debug("ops243: dropped a line of %d bytes", len(line))
            elif line.strip():
                item = self.parse(line)
                if item is not None:
                    out.append(item)
        del buf[:start]
        if len(buf) > self.cap:
            self._count("overlong_lines", 1)
            log.debug("ops243: %d bytes without a line end, keeping the last %d",
                      len(buf), KEEP_ON_OVERFLOW)
            del buf[:-KEEP_ON_OVERFLOW]
        return out

    def _parse_json(self, text: str) -> Reply | _Parsed | None:
        item, pos = _parse_json(text)
        if pos > 0:
            # Bytes before the object: a truncated line or line noise merged into this one.
            self._count("garbage_prefix", 1)
            log.debug("ops243: dropped %r before a JSON object", text[:pos][:80])
        return item

    def parse(self, line: bytes) -> Item | None:
        text = line.decode("ascii", errors="replace").strip()
        if "\ufffd" in text:
            self._count("non_ascii", 1)
        from_json = "{" in text
        item = self._parse_json(text) if from_json else _parse_plain(text)
        if item is None:
            self._count("bad_lines", 1)
            log.debug("ops243: unparsable line %r", text[:80])
            return None
        if isinstance(item, Reply):
            return item
        speeds, unit, direction, mags, t = item
        if unit is None:
            factor: float | None = self.unit_factor_mps
        else:
            factor = unit_factor(unit)
        if factor is None:
            self._count("unknown_units", 1)
            log.debug("ops243: unknown unit %r in %r", unit, text[:80])
            return None
        converted = []
        for s in speeds:
            v = s * factor
            if direction is not None:
                v = math.copysign(abs(v), direction)
            if not math.isfinite(v) or abs(v) > PLAUSIBLE_MPS:
                self._count("implausible", 1)
                log.debug("ops243: implausible speed %r in %r", s, text[:80])
                return None
            converted.append(v)
        return SpeedReport(tuple(converted), tuple(mags), t, from_json)


_Parsed = tuple[list[float], str | None, float | None, list[float], float | None]


def _noop_count(key: str, n: int) -> None:
    pass


def _line_end(buf: bytearray, start: int) -> int:
    """Index of the next CR or LF at or after ``start``, or -1."""
    cr = buf.find(b"\r", start)
    lf = buf.find(b"\n", start)
    if cr < 0:
        return lf
    if lf < 0:
        return cr
    return min(cr, lf)


def _parse_json(text: str) -> tuple[Reply | _Parsed | None, int]:
    """The parsed object at the end of ``text`` and where it starts (-1 if none)."""
    obj: Any = None
    pos = len(text)
    while (pos := text.rfind("{", 0, pos)) >= 0:
        try:
            obj = parse_json(text[pos:], max_bytes=MAX_LINE_BYTES, max_depth=4)
        except JsonRefused:
            continue
        if isinstance(obj, dict):
            break
        obj = None
    if not isinstance(obj, dict) or "\ufffd" in text[pos:]:
        return None, -1
    return _interpret(obj), pos


def _interpret(obj: dict[str, Any]) -> Reply | _Parsed | None:
    reply = Reply(obj)
    raw_speed = reply.get("speed", "velocity")
    if raw_speed is None:
        return reply
    speeds = _numbers(raw_speed)
    if speeds is None:
        return None
    unit = reply.get("unit", "units", "speedunits")
    direction = _direction(reply.get("direction", "dir"))
    if direction == 0.0:
        return None
    raw_mags = reply.get("magnitude", "mag")
    mags = _numbers(raw_mags) if raw_mags is not None else []
    if mags is None:
        return None  # a magnitude that is not a number must not skip the magnitude floor
    return speeds, (str(unit) if unit is not None else None), direction, mags, _number(
        reply.get("time"))


def _direction(value: Any) -> float | None:
    """+1 inbound, -1 outbound, None when absent, 0 when present but not understood."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in INBOUND:
        return 1.0
    if text in OUTBOUND:
        return -1.0
    return 0.0


def _parse_plain(text: str) -> _Parsed | None:
    tokens = [t.strip().strip('"') for t in re.split(r"[,\s]+", text) if t.strip().strip('"')]
    numbers: list[float] = []
    unit: str | None = None
    for tok in tokens:
        n = _number(tok)
        if n is not None:
            numbers.append(n)
        elif unit is None and unit_factor(tok) is not None:
            unit = tok
        else:
            return None
    if not numbers or len(numbers) > 2:
        return None
    # Two numbers: magnitude then speed (the order the radar prints them with OM).
    mags = numbers[:-1]
    return [numbers[-1]], unit, None, mags, None
