"""Which requests read a set of points: contiguous points coalesced, each request within the
protocol's limits (125 registers, 2000 bits) and the device's own ``max_registers``.

Points are sorted by table and address and joined while the next one starts no more than
``max_gap`` unused registers after the current request ends and the request stays within its
limit. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drivers.modbus.decode import bit_field, decode, physical, unsigned
from drivers.modbus.profile import BIT_TABLES, FUNCTION, ResolvedPoint
from drivers.serial.modbus import MAX_READ_BITS, MAX_READ_REGISTERS


@dataclass(frozen=True, slots=True)
class Request:
    table: str
    start: int
    count: int
    points: tuple[ResolvedPoint, ...]

    @property
    def function(self) -> int:
        return FUNCTION[self.table]


def plan(points: Sequence[ResolvedPoint], max_registers: int = MAX_READ_REGISTERS,
         max_gap: int = 0) -> list[Request]:
    out: list[Request] = []
    ordered = sorted(points, key=lambda p: (p.table, p.address))
    group: list[ResolvedPoint] = []
    start = end = 0  # end: one past the last register of the group
    for p in ordered:
        limit = MAX_READ_BITS if p.table in BIT_TABLES else min(max_registers,
                                                                 MAX_READ_REGISTERS)
        p_end = p.address + p.span
        if (group and p.table == group[0].table and p.address <= end + max_gap
                and max(end, p_end) - start <= limit):
            group.append(p)
            end = max(end, p_end)
            continue
        if group:
            out.append(Request(group[0].table, start, end - start, tuple(group)))
        group, start, end = [p], p.address, p_end
    if group:
        out.append(Request(group[0].table, start, end - start, tuple(group)))
    return out


def value_of(p: ResolvedPoint, words: Sequence[int]) -> float:
    """The canonical value of ``p`` from the words (or bits as 0/1) of its span."""
    if p.table in BIT_TABLES:
        return float(bool(words[0]))
    if p.type == "bool":
        return 1.0 if words[0] else 0.0
    raw = decode(words, p.type, p.order)
    if p.bit is not None:
        raw = bit_field(unsigned(int(raw), p.type), p.bit, p.width)
    return physical(raw, p.scale, p.offset, p.factor)


def decode_request(req: Request, values: Sequence[int]) -> list[tuple[ResolvedPoint, float]]:
    """Each point of ``req`` with its value, from the registers (or bits) the reply carried."""
    if len(values) < req.count:
        raise ValueError(f"reply carries {len(values)} values, the request asked {req.count}")
    out = []
    for p in req.points:
        i = p.address - req.start
        out.append((p, value_of(p, values[i:i + p.span])))
    return out
