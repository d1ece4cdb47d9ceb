"""Command line: ``serial ports``, ``serial sniff``, ``pzem reset-energy``.

Mounted by the agent's CLI through ``register(sub)``; each handler returns an exit code
(0 ok, 1 device failure, 2 bad usage or config) and prints to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.clock import SystemClock
from drivers.base import BuildContext, DriverError
from drivers.registry import build_sensor

BY_ID_DIR = "/dev/serial/by-id"
SNIFF_DRIVERS = ("ops243", "pzem004t", "pms5003")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serial_p = sub.add_parser("serial", help="serial ports and the devices on them")
    serial_sub = serial_p.add_subparsers(dest="serial_command", required=True)

    ports = serial_sub.add_parser(
        "ports", help="list serial ports, their stable by-id names and which sensor uses each")
    ports.add_argument("-c", "--config", help="agent config whose sensors to match to ports")
    ports.add_argument("--by-id-dir", default=BY_ID_DIR, help=argparse.SUPPRESS)
    ports.set_defaults(func=cmd_ports)

    sniff = serial_sub.add_parser("sniff", help="show decoded frames from a port, live")
    sniff.add_argument("port", help='port path, or "emulated" for the built-in emulator')
    sniff.add_argument("--driver", required=True, choices=SNIFF_DRIVERS)
    sniff.add_argument("--duration", type=float, default=10.0, help="stop after S seconds")
    sniff.add_argument("--count", type=int, default=0, help="stop after N frames (0: no limit)")
    sniff.add_argument("--address", type=lambda s: int(s, 0), default=1,
                       help="pzem004t: Modbus address to poll")
    sniff.add_argument("--period", type=float, default=1.0, help="pzem004t: poll period (s)")
    sniff.add_argument("--timeout", type=float, default=2.0, help="reply timeout (s)")
    sniff.add_argument("--configure", action="store_true",
                       help="ops243: send the JSON/units/window configuration first")
    sniff.set_defaults(func=cmd_sniff)

    pzem_p = sub.add_parser("pzem", help="PZEM-004T energy meter maintenance")
    pzem_sub = pzem_p.add_subparsers(dest="pzem_command", required=True)
    reset = pzem_sub.add_parser("reset-energy", help="zero a meter's energy counter")
    reset.add_argument("port")
    reset.add_argument("--address", type=lambda s: int(s, 0), required=True)
    reset.add_argument("--timeout", type=float, default=2.0)
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
            for p in exc.problems:
                print(f"  {p}")
            return 2
        for s in cfg.sensors:
            if s.port and s.port != "emulated":
                configured.append((s.name, s.driver, s.port))
                real = _resolve(s.port)
                if real:
                    users.setdefault(real, []).append(s.name)
    by_id = _by_id(args.by_id_dir)
    found = sorted(list_ports.comports(), key=lambda p: p.device)
    print("PORT                  USB ID     DESCRIPTION                        USED BY")
    for p in found:
        real = os.path.realpath(p.device)
        usb = f"{p.vid:04x}:{p.pid:04x}" if p.vid is not None and p.pid is not None else "-"
        desc = " ".join(x for x in (p.manufacturer, p.product) if x) or p.description or "-"
        used = ", ".join(users.get(real, [])) or "-"
        print(f"{p.device:<21} {usb:<10} {desc[:34]:<34} {used}")
        for link in by_id.get(real, []):
            print(f"  {link}")
    if not found:
        print("(no serial ports found)")
    if configured:
        print()
        print("CONFIGURED SENSOR     DRIVER     PORT -> DEVICE")
        for name, driver, port in configured:
            real = _resolve(port)
            state = real if real else "MISSING"
            print(f"{name:<21} {driver:<10} {port} -> {state}")
    return 0


# -- serial sniff ------------------------------------------------------------------------


def _sensor_config(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    from agent.config.schema import SensorConfig

    return SensorConfig(
        name="sniff", driver=args.driver, port=args.port, timeout_s=args.timeout,
        period_s=args.period, address=args.address if args.driver == "pzem004t" else None,
        options=options,
    )


async def _sniff(args: argparse.Namespace, show: Callable[[str], None]) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration
    shown = 0

    count: int = args.count

    def more() -> bool:
        return (not count or shown < count) and loop.time() < deadline

    async with contextlib.AsyncExitStack() as stack:
        ctx = BuildContext(SystemClock(), stack)
        if args.driver == "pzem004t":
            from drivers.serial.pzem004t import PzemSensor

            meter = build_sensor(_sensor_config(args, {"retries": 0}), ctx)
            assert isinstance(meter, PzemSensor)
            await meter.open()
            stack.push_async_callback(meter.close)
            while more():
                try:
                    m = await meter.bus.read_measurement(args.address, retries=0)
                    show(f"meter {args.address:#04x}: {m.voltage_v:.1f} V {m.current_a:.3f} A "
                         f"{m.power_w:.1f} W {m.energy_wh:.0f} Wh {m.frequency_hz:.1f} Hz "
                         f"PF {m.power_factor:.2f} alarm {'on' if m.alarm else 'off'}")
                    shown += 1
                except DriverError as exc:
                    show(f"error: {exc}")
                await asyncio.sleep(min(args.period, max(0.0, deadline - loop.time())))
            return 0
        feed: Callable[[bytes], Sequence[object]]
        if args.driver == "pms5003":
            from drivers.serial.pms5003 import Pms5003Sensor

            pm = build_sensor(_sensor_config(args, {}), ctx)
            assert isinstance(pm, Pms5003Sensor)
            await pm.open()
            stack.push_async_callback(pm.close)
            port, feed = pm.port, pm.parser.feed
        else:
            from drivers.serial.ops243 import Ops243Sensor

            radar = build_sensor(_sensor_config(args, {"configure": args.configure}), ctx)
            assert isinstance(radar, Ops243Sensor)
            await radar.open()
            stack.push_async_callback(radar.close)
            port, feed = radar.port, radar.parser.feed
        while more():
            data = await port.read(max(0.0, deadline - loop.time()))
            for item in feed(data):
                show(_describe(item))
                shown += 1
        return 0


def _describe(item: Any) -> str:
    from drivers.serial.ops243_reports import Reply, SpeedReport
    from drivers.serial.pms5003 import PmsFrame

    if isinstance(item, PmsFrame):
        counts = " ".join(str(n) for n in item.particles)
        return (f"PM1.0 {item.pm1_0} PM2.5 {item.pm2_5} PM10 {item.pm10} ug/m3 "
                f"(CF=1 {item.pm1_0_cf1}/{item.pm2_5_cf1}/{item.pm10_cf1}) counts {counts}")
    if isinstance(item, SpeedReport):
        speeds = " ".join(f"{v:+.2f}" for v in item.speeds_mps)
        mags = f" magnitude {' '.join(f'{m:g}' for m in item.magnitudes)}" if item.magnitudes \
            else ""
        return f"speed {speeds} m/s{mags}"
    if isinstance(item, Reply):
        return f"reply {item.fields}"
    return repr(item)


def cmd_sniff(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.count < 0:
        print("--duration must be positive and --count not negative")
        return 2
    try:
        return asyncio.run(_sniff(args, lambda line: print(line, flush=True)))
    except DriverError as exc:
        print(f"error: {exc}")
        return 1


# -- pzem reset-energy -------------------------------------------------------------------


def cmd_reset_energy(args: argparse.Namespace) -> int:
    from drivers.serial.pzem004t import reset_energy

    if not 0x01 <= args.address <= 0xF8:
        print(f"--address {args.address:#04x} outside 0x01..0xF8")
        return 2
    try:
        asyncio.run(reset_energy(args.port, args.address, timeout_s=args.timeout))
    except DriverError as exc:
        print(f"error: {exc}")
        return 1
    print(f"energy counter reset on meter {args.address:#04x} at {args.port}")
    return 0
