"""``edge-agent sensors ...``: commands that work on devices directly, without the agent."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from agent import jsontext
from agent.aio import within
from agent.cli.defaults import DEFAULT_CONFIG, missing_config
from agent.readings import Reading


async def read_once(cfg_path: str, name: str, timeout_s: float, count: int) -> list[Reading]:
    """Open one configured sensor, collect ``count`` readings (or one poll), close it."""
    from agent.clock import SystemClock
    from agent.config.load import load_config
    from drivers.base import BuildContext, PolledSensor
    from drivers.registry import build_sensor

    cfg = load_config(cfg_path)
    scfg = cfg.sensor(name)
    out: list[Reading] = []
    async with contextlib.AsyncExitStack() as stack:
        ctx = BuildContext(clock=SystemClock(), stack=stack)
        sensor = build_sensor(scfg, ctx)
        await within(sensor.open(), timeout_s)
        try:
            if isinstance(sensor, PolledSensor) and count <= 0:
                out.extend(await within(sensor.sample(), timeout_s))
            else:
                want = max(count, 1)
                got = asyncio.Event()

                def emit(r: Reading) -> None:
                    out.append(r)
                    if len(out) >= want:
                        got.set()

                task = asyncio.create_task(sensor.run(emit), name=f"read:{name}")
                waiter = asyncio.create_task(got.wait(), name="read-wait")
                try:
                    done, _ = await asyncio.wait({task, waiter}, timeout=timeout_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:  # also on Ctrl-C: the sensor stops before its port is closed
                    for t in (task, waiter):
                        t.cancel()
                    await asyncio.gather(task, waiter, return_exceptions=True)
                if task in done and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            await sensor.close()
    return out


def cmd_read(args: argparse.Namespace) -> int:
    from agent.config.load import ConfigError
    from drivers.base import DriverError

    if missing := missing_config(args.config):
        print(missing, file=sys.stderr)
        return 2
    try:
        readings = asyncio.run(read_once(args.config, args.name, args.timeout, args.count))
    except ConfigError as exc:
        for line in exc.lines():
            print(line)
        return 2
    except KeyError:
        print(f"no sensor named {args.name!r} in {args.config}")
        return 2
    except (DriverError, OSError, TimeoutError) as exc:
        print(f"{args.name}: {type(exc).__name__}: {exc or 'timed out'}")
        return 1
    if not readings:
        print(f"{args.name}: no reading within {args.timeout} s")
        return 1
    if args.json:
        print(jsontext.dumps([_as_dict(r) for r in readings], indent=2))
        return 0
    from agent.control.units import for_display

    for r in readings:
        flags = f"  [{r.quality}: {', '.join(r.reasons)}]" if r.reasons else ""
        value, unit = for_display(r.value, r.unit)
        print(f"{r.sensor}.{r.quantity:<16} {value:>14.6g} {unit}".rstrip() + flags)
    return 0


def _as_dict(r: Reading) -> dict[str, Any]:
    return {"sensor": r.sensor, "quantity": r.quantity, "value": r.value, "unit": r.unit,
            "ts_ns": r.ts_ns, "quality": r.quality, "reasons": list(r.reasons)}


def cmd_drivers(args: argparse.Namespace) -> int:
    """Every driver with where it came from; a plugin that fails to load is listed with its
    error (exit 1), and the others are still listed."""
    from drivers.registry import table

    rows = []
    for name, info, error in table():
        if info is None:
            rows.append({"name": name, "kind": "", "origin": "plugin", "description": "",
                         "error": error})
            continue
        addrs = ""
        if info.addresses:
            addrs = f"addresses {info.addresses[0]:#04x}..{info.addresses[-1]:#04x}"
        rows.append({"name": name, "kind": info.kind, "origin": info.origin,
                     "description": info.description, "addresses": addrs, "error": ""})
    if getattr(args, "json", False):
        print(jsontext.dumps(rows, indent=2))
    else:
        for r in rows:
            if r["error"]:
                print(f"{r['name']:<10} FAILED  {r['error']}")
                continue
            extra = f"  {r['addresses']}" if r["addresses"] else ""
            print(f"{r['name']:<10} {r['kind']:<7} {r['origin']:<28} {r['description']}{extra}")
    return 1 if any(r["error"] for r in rows) else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sensors", help="read a configured sensor directly; list drivers")
    ssub = p.add_subparsers(dest="sensors_command", metavar="ACTION")
    ssub.required = True
    r = ssub.add_parser("read", help="take one reading of sensor NAME and print it "
                                     "(the agent need not be running)")
    r.add_argument("name")
    r.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"agent TOML file (default {DEFAULT_CONFIG})")
    r.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    r.add_argument("--count", type=int, default=0,
                   help="readings to collect from a streaming sensor (default: one poll)")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_read)
    d = ssub.add_parser("drivers", help="list the known drivers, built in and from plugins")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_drivers)
