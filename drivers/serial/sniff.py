"""``edge-agent serial sniff``: decoded frames from a port, live, with the time each arrived.

Each frame is one line, prefixed with its local arrival time; ``--hex`` adds the raw bytes as
they came off the wire (the streaming drivers; the PZEM is polled, its exchange is the
driver's), ``--json`` writes one JSON object per frame. Exit codes: 0 when at least one frame
was decoded, 1 when none arrived in time or the port failed (the message says which, and names
the process holding a busy port), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from agent import jsontext
from agent.clock import SystemClock
from drivers.base import BuildContext, DriverError
from drivers.registry import build_sensor

SNIFF_DRIVERS = ("ops243", "pzem004t", "pms5003")
HEX_LINE = 16  # bytes per hex line, as hexdump -C
BUSY_MARKERS = ("lock", "busy", "ebusy", "eagain", "resource temporarily unavailable")

Show = Callable[[str, Any, bytes], None]


def register(serial_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sniff = serial_sub.add_parser(
        "sniff", help="show decoded frames from a port, live",
        description="Decode frames from PORT as they arrive, each with its arrival time. "
                    "Exit 0 when at least one frame was decoded, 1 when none arrived within "
                    "--duration or the port failed (a busy port names who holds it), 2 for "
                    "bad arguments.")
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
    sniff.add_argument("--hex", action="store_true",
                       help="also show the raw bytes received (ops243, pms5003)")
    sniff.add_argument("--json", action="store_true",
                       help="one JSON object per frame: {time, frame, raw}")
    sniff.set_defaults(func=cmd_sniff)


def _sensor_config(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    from agent.config.schema import SensorConfig

    return SensorConfig(
        name="sniff", driver=args.driver, port=args.port, timeout_s=args.timeout,
        period_s=args.period, address=args.address if args.driver == "pzem004t" else None,
        options=options,
    )


async def sniff(args: argparse.Namespace, show: Show) -> int:
    """Decode frames until ``--count`` or ``--duration``; the number shown."""
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
                         f"PF {m.power_factor:.2f} alarm {'on' if m.alarm else 'off'}", m, b"")
                    shown += 1
                except DriverError as exc:
                    show(f"error: {exc}", {"error": str(exc)}, b"")
                await asyncio.sleep(min(args.period, max(0.0, deadline - loop.time())))
            return shown
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
            raw = data
            for item in feed(data):
                show(describe(item), item, raw)
                raw = b""  # the chunk's bytes go with its first frame
                shown += 1
            if raw and args.hex:
                show("(no complete frame yet)", None, raw)
        return shown


def describe(item: Any) -> str:
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


def hex_lines(data: bytes) -> list[str]:
    """``data`` as hexdump -C does it: offset, sixteen bytes in hex, the printable ones."""
    lines = []
    for at in range(0, len(data), HEX_LINE):
        chunk = data[at:at + HEX_LINE]
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"  {at:04x}  {chunk.hex(' '):<{HEX_LINE * 3 - 1}}  |{text}|")
    return lines


def _as_json(item: Any) -> Any:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {"type": type(item).__name__, **dataclasses.asdict(item)}
    return item


def port_holders(path: str) -> list[str]:
    """``pid (name)`` of every process with ``path`` open that this user may look at."""
    try:
        target = os.path.realpath(path)
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(_points_at(f"/proc/{pid}/fd/{fd}", target) for fd in fds):
                with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
                    found.append(f"{pid} ({fh.read().strip()})")
    return found


def _points_at(link: str, target: str) -> bool:
    try:
        return os.readlink(link) == target
    except OSError:
        return False


def busy_hint(port: str, message: str) -> str:
    """What to do about a port another program holds; "" when the failure is something else."""
    if not any(m in message.lower() for m in BUSY_MARKERS):
        return ""
    holders = [h for h in port_holders(port) if not h.startswith(f"{os.getpid()} ")]
    who = f" (held by {', '.join(holders)})" if holders else ""
    return (f"the port is busy{who}: the running agent keeps its ports locked. Watch its "
            "readings with `edge-agent tail SENSOR`, or stop it first "
            "(sudo systemctl stop edge-agent) to sniff the raw line")


def cmd_sniff(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.count < 0:
        print("--duration must be positive and --count not negative", file=sys.stderr)
        return 2

    def show(line: str, item: Any, raw: bytes) -> None:
        now = dt.datetime.now()
        if args.json:
            doc = {"time": now.isoformat(timespec="milliseconds"), "frame": _as_json(item)}
            if args.hex:
                doc["raw"] = raw.hex()
            print(jsontext.dumps(doc), flush=True)
            return
        print(f"{now.strftime('%H:%M:%S.%f')[:-3]}  {line}", flush=True)
        if args.hex and raw:
            print("\n".join(hex_lines(raw)), flush=True)

    try:
        shown = asyncio.run(sniff(args, show))
    except DriverError as exc:
        hint = busy_hint(args.port, str(exc))
        print(f"error: {exc}" + (f"\n{hint}" if hint else ""))
        return 1
    if not shown:
        quiet = (" (the radar reports only while something moves in its beam)"
                 if args.driver == "ops243" else "")
        print(f"no {args.driver} frame from {args.port} within {args.duration:g} s{quiet}: "
              "check power, wiring (sensor TX to adapter RX) and that --driver is right",
              file=sys.stderr)
        return 1
    return 0
