"""The ``edge-agent`` command line.

Every command is a function that takes the parsed arguments and returns its exit code, so tests
call them directly. Exit codes:

    0  success
    1  failure at run time (device error, broker unreachable, test failed)
    2  bad usage or an invalid configuration file
    3  the agent is not running (commands that talk to it)
    130 interrupted (Ctrl-C)

Ctrl-C and a closed pipe are handled here, once for every command: Ctrl-C exits 130 without a
traceback, and a reader that goes away (``edge-agent status --json | head``) ends the command
quietly with 0, since the reader took what it wanted; the rest of the output goes to /dev/null.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from agent import __version__, jsontext
from agent.cli.defaults import DEFAULT_CONFIG, missing_config

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

log = logging.getLogger(__name__)

# Command groups that live beside the code they drive; each module has ``register(sub)``.
PLUGIN_MODULES = (
    "agent.cli.sensors",
    "agent.cli.control",
    "drivers.i2c.cli",
    "drivers.serial.cli",
    "drivers.modbus.cli",
    "models.cli",
    "agent.cli.models_site",  # joins the `model` group made by models.cli
    "firmware_bridge.cli",
    "agent.cli.service",
    "agent.cli.sharing",
    "agent.cli.fleet",
    "agent.cli.completion",
)

# The commands those modules add, with their one-line help, so that `--help` and a command
# from another module import none of them (drivers bring pydantic, models numpy and
# onnxruntime). A test holds this table to what the modules register.
PLUGIN_COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sensors": ("read a configured sensor directly; list drivers",
                ("agent.cli.sensors", "agent.cli.control")),
    "status": ("one screen on the running agent: sensors, uplink, outbox, models",
               ("agent.cli.control",)),
    "tail": ("follow live readings, windows and inferences (Ctrl-C to stop)",
             ("agent.cli.control",)),
    "reload": ("reload the config file (like systemctl reload) and report the result",
               ("agent.cli.control",)),
    "outbox": ("inspect or export the store-and-forward outbox", ("agent.cli.control",)),
    "i2c": ("I2C bus tools", ("drivers.i2c.cli",)),
    "serial": ("serial ports and the devices on them", ("drivers.serial.cli",)),
    "pzem": ("PZEM-004T energy meter maintenance", ("drivers.serial.cli",)),
    "modbus": ("find and read Modbus devices on a port or TCP address", ("drivers.modbus.cli",)),
    "profiles": ("Modbus device profiles, shipped and the site's own", ("drivers.modbus.cli",)),
    "model": ("edge models: list, test, verify, train", ("models.cli", "agent.cli.models_site")),
    "firmware": ("inspect and update a bridge microcontroller", ("firmware_bridge.cli",)),
    "install-service": ("install the hardened systemd unit, user and default config (root)",
                        ("agent.cli.service",)),
    "uninstall-service": ("remove the unit; keep config and data unless --purge (root)",
                          ("agent.cli.service",)),
    "sharing": ("what each stream publishes, on which topics, how redacted",
                ("agent.cli.sharing",)),
    "fleet": ("cloud side: make keys, sign and send commands to gateways", ("agent.cli.fleet",)),
    "completion": ("print the shell completion script for bash or zsh",
                   ("agent.cli.completion",)),
}

def _print_config_error(exc: Any) -> None:
    for line in exc.lines():
        print(line, file=sys.stderr)


def checked_config(path: str, *, strict: bool = True) -> tuple[Any, list[str]]:
    """The config at ``path`` and the problems `run` would meet, one line each.

    Everything `run` checks before it starts (``agent.preflight``), with no hardware opened;
    whatever the file is, the answer is a list of lines, never an exception. ``strict=False``
    (for `run`) logs what the agent can start without (a model that does not load) instead."""
    from agent.config.load import ConfigError, load_config
    from agent.preflight import preflight

    try:
        cfg = load_config(path)
        checked = preflight(cfg)
        if not strict:
            for p in checked.warnings:
                log.warning("%s: %s", path, p)
        found = checked.problems if strict else checked.errors
        return cfg, [f"{path}: {p}" for p in found]
    except ConfigError as exc:
        return None, exc.lines()
    except Exception as exc:  # the promise is a line per problem, not a traceback
        log.debug("checking %s failed", path, exc_info=True)
        return None, [f"{path}: cannot be checked: {type(exc).__name__}: {str(exc)[:300]}"]


def cmd_run(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.outbox.store import OutboxError
    from agent.runtime import Agent

    if missing := missing_config(args.config):  # said before any logging is set up
        print(missing, file=sys.stderr)
        return EXIT_USAGE
    logs.setup(args.log_level, args.log_format)
    cfg, problems = checked_config(args.config, strict=False)
    if problems or cfg is None:
        for line in problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    agent = Agent(cfg, config_path=args.config)
    try:
        return asyncio.run(agent.run())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OutboxError as exc:  # e.g. the file was replaced between the check and the start
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg, problems = checked_config(args.file)
    if args.json:
        print(jsontext.dumps({"file": args.file, "ok": not problems, "problems": problems}))
        return EXIT_USAGE if problems else EXIT_OK
    if problems or cfg is None:
        for line in problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    from drivers.plugins import failure

    for i, s in enumerate(cfg.sensors):
        if reason := failure(s.driver):
            # Not an invalid file: the agent starts, and this sensor fails (and is retried)
            # in the supervisor while the others run.
            print(f"{args.file}: warning: sensors[{i}] ({s.name}): {reason}", file=sys.stderr)
    print(f"{args.file}: ok (gateway {cfg.gateway.id}, {len(cfg.sensors)} sensors, "
          f"{len(cfg.streams)} streams, {len(cfg.models)} models)")
    return EXIT_OK


def cmd_config_reference(args: argparse.Namespace) -> int:
    from agent.config.reference import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    if args.json:
        print(jsontext.dumps({"name": "edge-agent", "version": __version__}))
    else:
        print(f"edge-agent {__version__}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo.run import run_demo

    try:
        return asyncio.run(run_demo(duration_s=args.duration, broker=args.broker,
                                    state_dir=args.state_dir, quiet=args.quiet,
                                    log_level=args.log_level))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given ``argv``, only the module of the command it names is imported
    (the other plugin commands are listed by name and help alone)."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Sensor gateway agent: acquire, clean, fuse, infer, store and forward.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad usage or invalid config, "
               "3 agent not running, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Completion and install-service need every command, whichever one is being run.
    parser.set_defaults(full_parser=lambda: build_parser(None))

    p = sub.add_parser("run", help="run the agent in the foreground (what systemd runs)")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"agent TOML file (default {DEFAULT_CONFIG})")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="auto", choices=["auto", "journal", "text", "json"])
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="check a configuration file or print its reference")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    c = csub.add_parser("check", help="validate FILE; one line per problem, exit 2 if invalid")
    c.add_argument("file")
    c.add_argument("--json", action="store_true", help="print {file, ok, problems} as JSON")
    c.set_defaults(func=cmd_config_check)
    c = csub.add_parser("reference", help="print every configuration key as Markdown")
    c.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("demo", help="run the whole pipeline on emulated devices and show the feed")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--broker", default=None, metavar="HOST:PORT",
                   help="use this broker instead of the embedded one")
    p.add_argument("--state-dir", default=None, help="keep the outbox here (default: a temp dir)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("version", help="print the version")
    p.add_argument("--json", action="store_true", help="print {name, version} as JSON")
    p.set_defaults(func=cmd_version)

    missing: list[str] = []
    command = _command_of(argv) if argv is not None else None
    wanted = (PLUGIN_MODULES if argv is None else
              PLUGIN_COMMANDS[command][1] if command in PLUGIN_COMMANDS else ())
    for name in PLUGIN_MODULES:
        if name not in wanted:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            # An optional command group whose module is not installed must not break the rest,
            # but --help says which is missing and why.
            log.debug("CLI module %s not available: %s", name, exc)
            missing.append(f"{name} ({exc})")
            continue
        module.register(sub)
    if missing:
        parser.epilog = (f"{parser.epilog} Commands not available here: "
                         f"{'; '.join(missing)}.")
    if argv is not None:
        for name, (help_text, _) in PLUGIN_COMMANDS.items():
            if name not in sub.choices:
                sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _stdout_to_devnull() -> None:
    """After a broken pipe: the interpreter's final flush must not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:  # a listed command whose module could not be imported
            parser.error(f"command {args.command!r} is not available on this installation")
        rc: int = func(args)
        sys.stdout.flush()  # a reader that left shows up here, not at interpreter exit
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_OK
    return rc


if __name__ == "__main__":
    sys.exit(main())
