"""Command line: ``modbus scan``, ``modbus read``, ``profiles list``, ``profiles show``.

Mounted by the agent's CLI through ``register(sub)``; each handler returns an exit code
(0 ok, 1 device failure, 2 bad usage or a bad profile).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from typing import Any

from agent import jsontext
from drivers.base import DriverError, ProtocolError
from drivers.modbus.decode import ORDERS, WORDS, decode
from drivers.modbus.options import tcp_target
from drivers.modbus.profile import (
    FUNCTION,
    SITE_DIR,
    ProfileError,
    list_profiles,
    load_profile,
)
from drivers.modbus.rtu import RtuLine, frame_gap_s
from drivers.modbus.tcp import TcpLink
from drivers.serial.modbus import MAX_READ_REGISTERS
from drivers.serial.port import SerialPort

TABLES = ("holding", "input")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("modbus", help="find and read Modbus devices on a port or TCP address")
    msub = p.add_subparsers(dest="modbus_command", required=True)

    def line_args(c: argparse.ArgumentParser) -> None:
        c.add_argument("port", help="serial port, or tcp://HOST:PORT")
        c.add_argument("--baudrate", type=int, default=9600)
        c.add_argument("--parity", choices=["N", "E", "O"], default="N")
        c.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
        c.add_argument("--table", choices=TABLES, default="holding",
                       help="register table (function 03 holding, 04 input)")
        c.add_argument("--json", action="store_true", help="print JSON")

    scan = msub.add_parser("scan", help="probe unit ids with a one-register read")
    line_args(scan)
    scan.add_argument("--units", default="1-247", help="unit ids, e.g. 1-247 or 1,2,10-20")
    scan.add_argument("--address", type=lambda s: int(s, 0), default=0,
                      help="register to read (default 0)")
    scan.add_argument("--timeout", type=float, default=0.1, help="reply timeout per unit (s)")
    scan.set_defaults(func=cmd_scan)

    read = msub.add_parser("read", help="read a block and decode it in every type and order")
    line_args(read)
    read.add_argument("--unit", type=lambda s: int(s, 0), required=True)
    read.add_argument("--address", type=lambda s: int(s, 0), required=True)
    read.add_argument("--count", type=int, required=True)
    read.add_argument("--timeout", type=float, default=1.0)
    read.set_defaults(func=cmd_read)

    p = sub.add_parser("profiles", help="Modbus device profiles, shipped and the site's own")
    psub = p.add_subparsers(dest="profiles_command", required=True)
    ls = psub.add_parser("list", help="list the profiles")
    ls.add_argument("--dir", default=SITE_DIR, help=f"site profile folder (default {SITE_DIR})")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_profiles_list)
    show = psub.add_parser("show", help="show one profile's points and planned requests")
    show.add_argument("name")
    show.add_argument("--dir", default=SITE_DIR, help=f"site profile folder (default {SITE_DIR})")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_profiles_show)


def _units(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        a, b = int(lo), int(hi or lo)
        if not 1 <= a <= b <= 247:
            raise ValueError(f"unit range {part!r} outside 1..247")
        out += range(a, b + 1)
    return out


def _link(args: argparse.Namespace) -> RtuLine | TcpLink:
    target = tcp_target(args.port)
    if target is not None:
        return TcpLink(*target)
    port = SerialPort(args.port, baudrate=args.baudrate, parity=args.parity,
                      stopbits=args.stopbits)
    return RtuLine(port, frame_gap_s(args.baudrate, args.parity, args.stopbits))


def _progress(done: int, total: int, found: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                     f"units, {found} answered")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


async def scan(args: argparse.Namespace, units: list[int]) -> list[dict[str, Any]]:
    link = _link(args)
    found: list[dict[str, Any]] = []
    try:
        if isinstance(link, RtuLine):
            await link.open()
        for i, unit in enumerate(units):
            try:
                regs = await link.read(unit, FUNCTION[args.table], args.address, 1,
                                       timeout_s=args.timeout, retries=0)
                found.append({"unit": unit, "reply": "registers", "value": regs[0]})
            except ProtocolError as exc:
                if "exception" in str(exc):  # something is there, it refused this register
                    found.append({"unit": unit, "reply": "exception", "detail": str(exc)})
            except DriverError:
                pass
            if not args.json:
                _progress(i + 1, len(units), len(found))
    finally:
        await link.close()
    return found


def cmd_scan(args: argparse.Namespace) -> int:
    try:
        units = _units(args.units)
        tcp_target(args.port)
    except ValueError as exc:
        print(f"modbus scan: {exc}", file=sys.stderr)
        return 2
    try:
        found = asyncio.run(scan(args, units))
    except DriverError as exc:
        print(f"modbus scan: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(jsontext.dumps({"port": args.port, "scanned": len(units), "found": found}))
    else:
        for f in found:
            detail = f"register {args.address} = {f['value']}" if f["reply"] == "registers" \
                else f["detail"]
            print(f"unit {f['unit']:>3}  {detail}")
        print(f"{len(found)} of {len(units)} unit ids answered")
    return 0 if found else 1


def decode_block(regs: list[int]) -> dict[str, dict[str, list[float | int | None]]]:
    """Every type in every order at every start offset (None where the type does not fit)."""
    out: dict[str, dict[str, list[float | int | None]]] = {}
    for type_ in ("u16", "i16", "u32", "i32", "f32", "u64", "i64", "f64"):
        n = WORDS[type_]
        orders = ("ABCD", "BADC") if n == 1 else ORDERS
        out[type_] = {}
        for order in orders:
            col: list[float | int | None] = []
            for i in range(len(regs)):
                col.append(decode(regs[i:i + n], type_, order) if i + n <= len(regs) else None)
            out[type_][order] = col
    return out


def _fmt(v: float | int | None) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


def cmd_read(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_READ_REGISTERS:
        print(f"modbus read: --count {args.count} outside 1..{MAX_READ_REGISTERS} (one Modbus "
              "request)", file=sys.stderr)
        return 2

    async def go() -> tuple[int, ...]:
        link = _link(args)
        try:
            if isinstance(link, RtuLine):
                await link.open()
            return await link.read(args.unit, FUNCTION[args.table], args.address, args.count,
                                   timeout_s=args.timeout, retries=1)
        finally:
            await link.close()

    try:
        regs = list(asyncio.run(go()))
    except ValueError as exc:
        print(f"modbus read: {exc}", file=sys.stderr)
        return 2
    except DriverError as exc:
        print(f"modbus read: {exc}", file=sys.stderr)
        return 1
    table = decode_block(regs)
    if args.json:
        print(jsontext.dumps({"unit": args.unit, "table": args.table, "address": args.address,
                          "registers": regs, "decoded": _json_safe(table)}))
        return 0
    print(f"unit {args.unit} {args.table} registers {args.address:#06x}.."
          f"{args.address + len(regs) - 1:#06x}")
    cols = [(t, o) for t, orders in table.items() for o in orders]
    for group in (cols[:4], cols[4:12], cols[12:16], cols[16:]):
        w = 2 + max(14, *(len(_fmt(v)) for t, o in group for v in table[t][o]))
        print("addr    hex  " + "".join(f"{t + ' ' + o:>{w}}" for t, o in group))
        for i, r in enumerate(regs):
            cells = "".join(f"{_fmt(table[t][o][i]):>{w}}" for t, o in group)
            print(f"{args.address + i:#06x} {r:04x} {cells}")
        print()
    return 0


def _json_safe(table: dict[str, dict[str, list[float | int | None]]]) -> Any:
    def safe(v: float | int | None) -> Any:
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)
    return {t: {o: [safe(v) for v in col] for o, col in orders.items()}
            for t, orders in table.items()}


def cmd_profiles_list(args: argparse.Namespace) -> int:
    rows = []
    for name, path, origin in list_profiles(args.dir):
        try:
            prof = load_profile(name, args.dir).profile
            rows.append({"name": name, "origin": origin, "path": str(path),
                         "model": f"{prof.manufacturer} {prof.model}".strip(),
                         "points": len(prof.points), "error": ""})
        except ProfileError as exc:
            rows.append({"name": name, "origin": origin, "path": str(path), "model": "",
                         "points": 0, "error": str(exc)})
    if args.json:
        print(jsontext.dumps(rows))
    else:
        for r in rows:
            what = r["error"] or f"{r['model']}, {r['points']} points"
            print(f"{r['name']:<20} {r['origin']:<8} {what}")
    return 2 if any(r["error"] for r in rows) else 0


def cmd_profiles_show(args: argparse.Namespace) -> int:
    from drivers.modbus.plan import plan

    try:
        loaded = load_profile(args.name, args.dir)
    except ProfileError as exc:
        for p in exc.problems:
            print(f"{exc.source}: {p}", file=sys.stderr)
        return 2
    prof = loaded.profile
    reqs = plan(loaded.points, prof.max_registers, prof.max_gap)
    if args.json:
        doc = prof.model_dump(mode="json")
        doc["path"] = loaded.path
        doc["requests"] = [{"table": r.table, "start": r.start, "count": r.count}
                           for r in reqs]
        print(jsontext.dumps(doc))
        return 0
    print(f"{prof.name}: {prof.manufacturer} {prof.model} ({loaded.path})")
    print(f"  document: {prof.document}")
    print(f"  line: {prof.baudrate} baud 8{prof.parity}{prof.stopbits}, "
          f"up to {prof.max_registers} registers a request")
    for pt in loaded.points:
        bits = f" bits {pt.bit}..{pt.bit + pt.width - 1}" if pt.bit is not None else ""
        print(f"  {pt.table:<8} {pt.address:#06x} {pt.type:<4} {pt.order}{bits:<10} "
              f"x{pt.scale:g}{pt.offset:+g} {pt.device_unit:>6} -> {pt.quantity} [{pt.unit}]")
    print(f"  {len(reqs)} request(s) a poll: "
          + ", ".join(f"{r.table} {r.start:#06x}+{r.count}" for r in reqs))
    return 0
