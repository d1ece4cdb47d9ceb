"""Command line: ``serial ports``, ``serial sniff`` (in ``sniff``), ``pzem reset-energy``.

Mounted by the agent's CLI through ``register(sub)``; each handler returns an exit code
(0 ok, 1 device failure, 2 bad usage or config) and prints to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

from agent import jsontext
from drivers.base import DriverError
from drivers.serial import sniff

BY_ID_DIR = "/dev/serial/by-id"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serial_p = sub.add_parser("serial", help="serial ports and the devices on them")
    serial_sub = serial_p.add_subparsers(dest="serial_command", required=True)

    ports = serial_sub.add_parser(
        "ports", help="list serial ports, their stable by-id names and which sensor uses each")
    ports.add_argument("-c", "--config", help="agent config whose sensors to match to ports")
    ports.add_argument("--by-id-dir", default=BY_ID_DIR, help=argparse.SUPPRESS)
    ports.add_argument("--json", action="store_true",
                       help="print {ports: [...], configured: [...]} as JSON")
    ports.set_defaults(func=cmd_ports)

    sniff.register(serial_sub)

    pzem_p = sub.add_parser("pzem", help="PZEM-004T energy meter maintenance")
    pzem_sub = pzem_p.add_subparsers(dest="pzem_command", required=True)
    reset = pzem_sub.add_parser("reset-energy", help="zero a meter's energy counter")
    reset.add_argument("port")
    reset.add_argument("--address", type=lambda s: int(s, 0), required=True)
    reset.add_argument("--timeout", type=float, default=2.0)
    reset.add_argument("-y", "--yes", action="store_true",
                       help="do not ask for confirmation (needed without a terminal)")
    reset.add_argument("--json", action="store_true", help="print the result as JSON")
    reset.set_defaults(func=cmd_reset_energy)


# -- serial ports ------------------------------------------------------------------------


def _by_id(directory: str) -> dict[str, list[str]]:
    """Resolved device path -> the stable names that point at it."""
    out: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for entry in sorted(Path(directory).iterdir()):
            out.setdefault(os.path.realpath(entry), []).append(str(entry))
    return out


def _resolve(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else ""


def cmd_ports(args: argparse.Namespace) -> int:
    from serial.tools import list_ports

    users: dict[str, list[str]] = {}
    configured: list[tuple[str, str, str]] = []
    if args.config:
        from agent.config.load import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            print(f"{exc.source}: invalid config")
            for line in exc.lines():
                print(f"  {line}")
            return 2
        for s in cfg.sensors:
            if s.port and s.port != "emulated":
                configured.append((s.name, s.driver, s.port))
                real = _resolve(s.port)
                if real:
                    users.setdefault(real, []).append(s.name)
    by_id = _by_id(args.by_id_dir)
    found = sorted(list_ports.comports(), key=lambda p: p.device)
    ports = []
    for p in found:
        real = os.path.realpath(p.device)
        ports.append({
            "device": p.device,
            "usb_id": f"{p.vid:04x}:{p.pid:04x}" if p.vid is not None and p.pid is not None
            else None,
            "description": " ".join(x for x in (p.manufacturer, p.product) if x)
            or p.description or None,
            "used_by": users.get(real, []), "by_id": by_id.get(real, [])})
    sensors = [{"sensor": name, "driver": driver, "port": port, "device": _resolve(port) or None}
               for name, driver, port in configured]
    if args.json:
        print(jsontext.dumps({"ports": ports, "configured": sensors}, indent=2))
        return 0
    print("PORT                  USB ID     DESCRIPTION                        USED BY")
    for row in ports:
        desc = row["description"] or "-"
        print(f"{row['device']:<21} {row['usb_id'] or '-':<10} {desc[:34]:<34} "
              f"{', '.join(row['used_by']) or '-'}")
        for link in row["by_id"]:
            print(f"  {link}")
    if not ports:
        print("(no serial ports found)")
    if sensors:
        print()
        print("CONFIGURED SENSOR     DRIVER     PORT -> DEVICE")
        for c in sensors:
            print(f"{c['sensor']:<21} {c['driver']:<10} {c['port']} -> {c['device'] or 'MISSING'}")
    return 0


# -- pzem reset-energy -------------------------------------------------------------------


def _confirmed(args: argparse.Namespace) -> bool | None:
    """Whether the technician agreed; None when nobody can be asked (no terminal)."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        return None
    try:
        answer = input(f"Zero the energy counter of meter {args.address:#04x} at {args.port}? "
                       "The total cannot be restored. [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_reset_energy(args: argparse.Namespace) -> int:
    from drivers.serial.pzem004t import reset_energy

    def result(ok: bool, message: str) -> None:
        if args.json:
            print(jsontext.dumps({"ok": ok, "port": args.port, "address": args.address,
                                  "message": message}))
        else:
            print(message)

    if not 0x01 <= args.address <= 0xF8:
        result(False, f"--address {args.address:#04x} outside 0x01..0xF8")
        return 2
    agreed = _confirmed(args)
    if agreed is None:
        result(False, "pzem reset-energy: not a terminal, so nobody could confirm: add --yes "
                      "to zero the counter without asking")
        return 2
    if not agreed:
        result(False, "not reset: the meter keeps its energy counter")
        return 1
    try:
        asyncio.run(reset_energy(args.port, args.address, timeout_s=args.timeout))
    except DriverError as exc:
        result(False, f"error: {exc}")
        return 1
    result(True, f"energy counter reset on meter {args.address:#04x} at {args.port}")
    return 0
