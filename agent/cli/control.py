"""Technician commands that talk to the running agent over its control socket.

``status``, ``tail``, ``reload``, ``outbox stats``, ``outbox export`` and ``sensors list``. The
socket is found from ``--socket``, else from the config file given with ``-c``, else the default
``/run/edge-agent/control.sock``, else (when that is absent) a running ``edge-agent demo``'s,
which is said on stderr. When no agent answers, the command says so and exits 3.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from agent.control.client import (
    DEFAULT_SOCKET,
    AgentNotRunning,
    ControlClient,
    ControlClientError,
    ControlProtocolError,
)
from agent.jsontext import dumps

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RELOAD_POLL_S = 0.2

Talk = Callable[[ControlClient, argparse.Namespace], int]


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _rich_ok() -> bool:
    """Colour and tables only on a terminal, and only when rich is installed."""
    if not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def socket_path(args: argparse.Namespace) -> str:
    if getattr(args, "socket", None):
        return str(args.socket)
    if getattr(args, "config", None):
        from agent.config.load import load_config

        return load_config(args.config).control.socket
    if not os.path.exists(DEFAULT_SOCKET):
        from agent.control.discovery import find_demo

        demo = find_demo()
        if demo is not None:
            # Said on stderr so that --json output stays one document.
            _err(f"(the installed agent's socket {DEFAULT_SOCKET} is absent: using the demo's, "
                 f"{demo.socket}, pid {demo.pid})")
            return demo.socket
    return DEFAULT_SOCKET


def _talking(fn: Talk) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        if getattr(args, "config", None) and not getattr(args, "socket", None):
            # The config loader (pydantic, the driver table) only when a config is named.
            from agent.config.load import ConfigError

            try:
                path = socket_path(args)
            except ConfigError as exc:
                for line in exc.lines():
                    _err(line)
                return EXIT_USAGE
        else:
            path = socket_path(args)
        try:
            with ControlClient(path, timeout_s=args.timeout) as client:
                return fn(client, args)
        except AgentNotRunning as exc:
            hint = "" if getattr(args, "socket", None) or getattr(args, "config", None) else (
                "; start it (sudo systemctl start edge-agent), or run `edge-agent demo`, "
                "which these commands find by themselves")
            _err(f"{exc}{hint}")
            return EXIT_NOT_RUNNING
        except ControlClientError as exc:
            _err(f"edge-agent: {exc}")
            return EXIT_FAIL
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    handler.__name__ = fn.__name__
    return handler


# -- status -------------------------------------------------------------------------------

def _status(client: ControlClient, args: argparse.Namespace) -> int:
    from agent.control.view import render_rich, render_text

    snap = client.call("status")
    if args.json:
        print(dumps(snap, indent=2, sort_keys=True))
    elif _rich_ok():
        render_rich(snap, sys.stdout)
    else:
        print(render_text(snap), end="")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if args.schema:
        from agent.control.view import status_schema

        print(dumps(status_schema(), indent=2))
        return EXIT_OK
    return _talking(_status)(args)


# -- tail ---------------------------------------------------------------------------------

def format_item(item: Mapping[str, Any]) -> str:
    from agent.control.tail_lines import format_item as line

    return line(item)


def known_names(snap: Mapping[str, Any]) -> dict[str, list[str]]:
    """The names ``tail`` can follow, by kind, from a status snapshot."""
    models = snap.get("models") or {}
    model_names = set((models.get("status") or {}).get("models") or {}) | set(
        models.get("last") or {})
    return {
        "sensors": sorted(str(s.get("name")) for s in snap.get("sensors") or []
                          if isinstance(s, Mapping)),
        "streams": sorted(str(k) for k in ((snap.get("windows") or {}).get("late") or {})),
        "models": sorted(str(k) for k in model_names),
    }


def _tail(client: ControlClient, args: argparse.Namespace) -> int:
    shown = 0
    if args.target:
        names = known_names(client.call("status"))
        if any(names.values()) and not any(args.target in v for v in names.values()):
            listed = "; ".join(f"{kind} {', '.join(v)}" for kind, v in names.items() if v)
            _err(f"edge-agent: no sensor, stream or model named {args.target!r} "
                 f"(known: {listed})")
            return EXIT_USAGE
    try:
        for event in client.stream("tail", {"match": args.target or ""}):
            kind = event.get("event")
            if kind == "dropped":
                _err(f"({event.get('count')} items dropped: the output is too slow)")
            elif kind == "item":
                item = event.get("item") or {}
                print(dumps(item) if args.json
                      else format_item(item), flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    _err("the agent ended the stream")
    return EXIT_FAIL


# -- reload -------------------------------------------------------------------------------

def _reload_result(args: argparse.Namespace, ok: bool, text: str, **extra: Any) -> int:
    if args.json:
        print(dumps({"ok": ok, "message": text, **extra}, sort_keys=True))
    elif ok:
        print(text)
    if not ok:
        _err(f"edge-agent: {text}")
    return EXIT_OK if ok else EXIT_FAIL


def _reload(client: ControlClient, args: argparse.Namespace) -> int:
    agent = client.call("status").get("agent") or {}
    if not agent.get("config_file"):
        # An agent started without a file (the demo runs a built-in config) has nothing to
        # read again: say so now rather than wait for a result that never comes.
        return _reload_result(args, False, f"the agent at {client.path} was not started from "
                              "a config file (the demo runs a built-in one): nothing to reload",
                              config_file=None)
    before = client.call("reload")
    if args.wait <= 0:
        return _reload_result(args, True, "reload requested", requested=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(RELOAD_POLL_S)
        agent = client.call("status").get("agent", {})
        if agent.get("reloads_rejected", 0) > (before.get("reloads_rejected") or 0):
            reason = agent.get("last_reload_error") or "no reason recorded"
            return _reload_result(args, False, "reload rejected, the agent keeps its running "
                                  f"config: {reason}", reason=reason)
        if agent.get("reloads_ok", 0) > (before.get("reloads_ok") or 0):
            return _reload_result(args, True, f"reloaded: generation {agent.get('generation')}",
                                  generation=agent.get("generation"))
    return _reload_result(args, False, f"reload of {agent.get('config_file')} requested, but "
                          f"the agent reported no result within {args.wait:g} s (generation "
                          f"{agent.get('generation')}, still starting the new one?); "
                          "`edge-agent status` shows the outcome when it is there",
                          generation=agent.get("generation"))


# -- outbox -------------------------------------------------------------------------------

def _outbox_stats(client: ControlClient, args: argparse.Namespace) -> int:
    from agent.control.view import outbox_stats_lines

    stats = client.call("outbox.stats")
    if args.json:
        print(dumps(stats, indent=2, sort_keys=True))
    else:
        print("\n".join(outbox_stats_lines(stats)))
    return EXIT_OK


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """``update(done, total)``; a bar on a terminal, nothing when piped."""
    if not _rich_ok():
        yield lambda done, total: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TransferSpeedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn(label), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


def _receive(events: Iterator[dict[str, Any]], out: BinaryIO,
             update: Callable[[int, int], None]) -> tuple[int, int]:
    total = rows = received = 0
    digest = hashlib.sha256()
    for event in events:
        kind = event.get("event")
        if kind == "begin":
            rows, total = int(event.get("rows", 0)), int(event.get("bytes", 0))
            update(0, total)
        elif kind == "chunk":
            try:
                data = base64.b64decode(event.get("data", ""), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ControlProtocolError(f"outbox.export: bad chunk: {exc}") from exc
            out.write(data)
            digest.update(data)
            received += len(data)
            update(received, total)
        elif kind == "end":
            if received != event.get("bytes"):
                raise ControlProtocolError(f"outbox.export: received {received} bytes, "
                                           f"the agent sent {event.get('bytes')}")
            if digest.hexdigest() != event.get("sha256"):
                raise ControlProtocolError("outbox.export: checksum mismatch")
            return rows, received
    raise ControlProtocolError("outbox.export: the agent closed the connection mid-export")


def _outbox_export(client: ControlClient, args: argparse.Namespace) -> int:
    target = Path(args.file)
    if target.exists() and not args.force:
        _err(f"{target} exists; use --force to replace it")
        return EXIT_USAGE
    part = target.with_name(target.name + ".part")
    try:
        with _progress("exporting outbox") as update, part.open("wb") as out:
            rows, size = _receive(client.stream("outbox.export"), out, update)
        os.replace(part, target)
    except OSError as exc:
        _err(f"cannot write {target}: {exc.strerror or exc}")
        return EXIT_FAIL
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    if args.json:
        print(dumps({"file": str(target), "rows": rows, "bytes": size}))
    else:
        print(f"exported {rows} rows ({size} bytes) to {target}")
    return EXIT_OK


# -- sensors ------------------------------------------------------------------------------

def _sensors_list(client: ControlClient, args: argparse.Namespace) -> int:
    from agent.control.view import SENSOR_HEADER, sensor_rows, table

    sensors = client.call("sensors.list", {"name": args.name} if args.name else {})["sensors"]
    if args.json:
        print(dumps(sensors, indent=2, sort_keys=True))
    elif not sensors:
        print("no sensors running")
    else:
        rows = [(*row[:5], str(s.get("readings", 0)), row[5])
                for row, s in zip(sensor_rows(sensors), sensors, strict=True)]
        print("\n".join(table((*SENSOR_HEADER[:5], "READINGS", SENSOR_HEADER[5]), rows)))
    return EXIT_OK


# -- registration -------------------------------------------------------------------------

def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="FILE",
                       help="agent TOML file (to find its control socket)")
    where.add_argument("--socket", metavar="PATH",
                       help=f"control socket of the agent (default {DEFAULT_SOCKET})")
    common.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for an answer (default 10)")
    return common


def _subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                 help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The ACTION group of command ``name``, joining it when another module made it first."""
    existing = sub.choices.get(name)
    if existing is not None:
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
        raise RuntimeError(f"command {name!r} exists and takes no actions")
    parser = sub.add_parser(name, help=help_text)
    group = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    group.required = True
    return group


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = _connection_options()

    p = sub.add_parser("status", parents=[common],
                       help="one screen on the running agent: sensors, uplink, outbox, models")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.add_argument("--schema", action="store_true",
                   help="print the JSON Schema of --json and exit (no agent needed)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("tail", parents=[common],
                       help="follow live readings, windows and inferences (Ctrl-C to stop)")
    p.add_argument("target", nargs="?", metavar="SENSOR|STREAM|MODEL",
                   help="only this sensor, stream or model")
    p.add_argument("-n", "--count", type=int, default=0, help="stop after N items")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_talking(_tail))

    p = sub.add_parser("reload", parents=[common],
                       help="reload the config file (like systemctl reload) and report the result")
    p.add_argument("--wait", type=float, default=15.0, metavar="S",
                   help="seconds to wait for the result (0: just ask; default 15)")
    p.add_argument("--json", action="store_true", help="print {ok, message, ...} as JSON")
    p.set_defaults(func=_talking(_reload))

    outbox = _subcommands(sub, "outbox", "inspect or export the store-and-forward outbox")
    p = outbox.add_parser("stats", parents=[common], help="depth, age, drops of the outbox")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_talking(_outbox_stats))
    p = outbox.add_parser("export", parents=[common],
                          help="copy every stored message to FILE (JSON lines)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--json", action="store_true", help="print {file, rows, bytes} as JSON")
    p.set_defaults(func=_talking(_outbox_export))

    sensors = _subcommands(sub, "sensors", "sensors of the running agent")
    p = sensors.add_parser("list", parents=[common],
                           help="every sensor of the running agent: state, last value, errors")
    p.add_argument("name", nargs="?", help="only this sensor")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_talking(_sensors_list))
