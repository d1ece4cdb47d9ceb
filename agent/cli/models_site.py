"""``edge-agent model history export`` and ``model activate``: calibrating the models to a site.

The history is read straight from its SQLite file (read-only, safe beside the running agent);
activation goes through the running agent's control socket, because only the agent has scored
the candidate on live windows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from agent import jsontext
from agent.cli.control import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    _connection_options,
    _err,
    _subcommands,
    _talking,
)
from agent.cli.defaults import DEFAULT_CONFIG
from agent.control.client import ControlClient, ControlRequestError


def _history_path(args: argparse.Namespace) -> Path | None:
    if args.db:
        return Path(args.db)
    from agent.config.load import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            _err(line)
        return None
    return Path(cfg.history_path())


def cmd_history_export(args: argparse.Namespace) -> int:
    from agent.pipeline.history import HistoryError, export_csv

    path = _history_path(args)
    if path is None:
        return EXIT_USAGE
    since = int(time.time() - args.days * 86_400) if args.days else None
    try:
        if args.out in ("", "-"):
            n = export_csv(path, sys.stdout, since_s=since, circuits=args.circuits)
        else:
            out = Path(args.out)
            if out.exists() and not args.force:
                _err(f"{out} exists; use --force to replace it")
                return EXIT_USAGE
            tmp = out.with_name(f".{out.name}.part")
            with tmp.open("w", encoding="utf-8", newline="") as fh:
                n = export_csv(path, fh, since_s=since, circuits=args.circuits)
            os.replace(tmp, out)
    except HistoryError as exc:
        _err(f"edge-agent: {exc}")
        return EXIT_FAIL
    except OSError as exc:
        _err(f"edge-agent: cannot write {args.out}: {exc.strerror or exc}")
        return EXIT_FAIL
    if args.out not in ("", "-"):
        summary = {"rows": n, "file": str(args.out), "history": str(path)}
        if args.json:
            print(jsontext.dumps(summary))
        elif args.circuits:
            print(f"{n} circuit windows of {args.circuits} written to {args.out} "
                  f"(calibrate with `python -m models.anomaly_eval --calibrate {args.out} "
                  "--lat .. --lon .. --tz .. --out thresholds.json`)")
        else:
            print(f"{n} model windows written to {args.out} (train a site model with "
                  f"`edge-agent model train --csv {args.out} --tz <site time zone>`)")
    return EXIT_OK


def _activate(client: ControlClient, args: argparse.Namespace) -> int:
    try:
        result = client.call("model.activate", {"name": args.name, "force": args.force})
    except ControlRequestError as exc:
        if args.json:
            print(jsontext.dumps({"activated": False, "name": args.name, "reason": exc.message}))
        _err(f"edge-agent: {exc.message}")
        return EXIT_FAIL
    if args.json:
        print(jsontext.dumps(result))
    else:
        how = " (forced)" if args.force else ""
        print(f"model {args.name}: candidate activated{how}: {result.get('reason')}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = _subcommands(sub, "model", "edge models")
    history = model.add_parser("history", help="the local history of model windows")
    hsub = history.add_subparsers(dest="history_command", metavar="ACTION", required=True)
    p = hsub.add_parser("export", help="write the history as the training CSV")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                       help=f"agent TOML file, to find the history (default {DEFAULT_CONFIG})")
    where.add_argument("--db", metavar="PATH", help="the history file itself")
    p.add_argument("-o", "--out", default="-", metavar="FILE",
                   help="CSV file to write (default: standard output)")
    p.add_argument("--days", type=float, default=0, metavar="N",
                   help="only the last N days (default: everything kept)")
    p.add_argument("--circuits", default="", metavar="STREAM",
                   help="instead: STREAM's circuit windows, as the anomaly calibration CSV "
                        "(python -m models.anomaly_eval --calibrate)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_history_export)

    p = model.add_parser("activate", parents=[_connection_options()],
                         help="make the running agent's shadow candidate the active model")
    p.add_argument("name", help="model name (traffic, energy)")
    p.add_argument("--force", action="store_true",
                   help="activate even if the candidate did not beat the active model and "
                        "persistence on the live windows")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_talking(_activate))
