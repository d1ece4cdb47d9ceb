"""What a process imports: the CLI commands that only talk to the socket, and an agent with no
model, load neither numpy nor onnxruntime (each checked in a fresh interpreter, by name in
``sys.modules``, not by time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "onnxruntime")


def fresh(code: str, timeout_s: float = 60.0) -> dict[str, object]:
    """Run ``code`` in a new interpreter; it leaves its result in ``result`` (a dict), and the
    heavy modules it loaded are added under ``loaded``."""
    program = (f"{code}\nimport json, sys\nresult['loaded'] = "
               f"sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
               "print(json.dumps(result))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, done.stderr
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def cli(argv: list[str]) -> str:
    return f"""
import contextlib, io
from agent.cli.main import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
    try:
        rc = main({argv!r})
    except SystemExit as exc:
        rc = exc.code
result = {{'rc': rc, 'out': buf.getvalue()}}
"""


def test_help_imports_neither_numpy_nor_onnxruntime() -> None:
    got = fresh(cli(["--help"]))
    assert got["rc"] == 0 and "status" in str(got["out"]) and "model" in str(got["out"])
    assert got["loaded"] == []


def test_the_checker_sees_a_heavy_import() -> None:
    got = fresh(cli(["--help"]) + "import numpy\n")
    assert got["loaded"] == ["numpy"]


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["tail"], ["reload"],
                                  ["outbox", "stats"]])
def test_socket_commands_import_neither(tmp_path: Path, argv: list[str]) -> None:
    # No agent listens there: the command goes as far as the socket and exits 3.
    got = fresh(cli([*argv, "--socket", str(tmp_path / "control.sock")]))
    assert got["rc"] == 3
    assert got["loaded"] == []


def test_an_agent_with_no_model_imports_neither(tmp_path: Path, broker: Mosquitto) -> None:
    code = f"""
import asyncio
from pathlib import Path
from tests.harness import make_config, running_agent, until

async def go():
    data = make_config(
        Path({str(tmp_path)!r}), {broker.port},
        sensors=[{{"name": "m", "driver": "synthetic", "period_s": 0.02,
                   "options": {{"quantity": "active_power", "unit": "W", "base": 500.0}}}}],
        streams=[{{"name": "energy", "sensors": ["m"], "window_s": 1}}])
    async with running_agent(data) as agent:
        p = agent.pipeline
        await until(lambda: p.windows_published >= 1, what="a window", timeout_s=30)
        return p.windows_published

result = {{'windows': asyncio.run(go())}}
"""
    got = fresh(code)
    assert isinstance(got["windows"], int) and got["windows"] >= 1
    assert got["loaded"] == []


def test_an_agent_with_the_shipped_models_never_imports_onnxruntime(
        tmp_path: Path, broker: Mosquitto) -> None:
    """The default runtime runs the shipped graphs in the numpy executor: neither the start-up
    check of the config nor the running agent loads onnxruntime (about 30 MiB of RSS)."""
    code = f"""
import asyncio
from pathlib import Path
from agent.config.load import parse_config
from agent.preflight import preflight
from tests.harness import make_config, running_agent, until

def synthetic(name, quantity, unit, base):
    return {{"name": name, "driver": "synthetic", "period_s": 0.05,
             "options": {{"quantity": quantity, "unit": unit, "base": base}}}}

async def go():
    data = make_config(
        Path({str(tmp_path)!r}), {broker.port},
        sensors=[synthetic("meter", "active_power", "W", 500.0),
                 synthetic("radar", "speed_in", "m/s", 12.0)],
        streams=[{{"name": "energy", "sensors": ["meter"], "window_s": 1}},
                 {{"name": "traffic", "sensors": ["radar"], "window_s": 1}}],
        models=[{{"name": "traffic", "stream": "traffic"}},
                {{"name": "energy", "stream": "energy"}}])
    checked = preflight(parse_config(data))
    assert not checked.problems, checked.problems
    async with running_agent(data) as agent:
        p = agent.pipeline
        await until(lambda: len(p.last_inference) >= 2, what="an inference of each model",
                    timeout_s=30)
        return sorted(m["runtime"] for m in p.infer.status()["models"].values())

result = {{'runtimes': asyncio.run(go())}}
"""
    got = fresh(code)
    assert got["runtimes"] == ["numpy", "numpy"]
    assert got["loaded"] == ["numpy"]


def test_the_default_socket_is_one_value_everywhere() -> None:
    from agent.config.schema import ControlConfig
    from agent.control import client, server

    assert client.DEFAULT_SOCKET == server.DEFAULT_SOCKET == ControlConfig().socket


def test_the_command_table_is_what_the_modules_register() -> None:
    import argparse
    import importlib

    from agent.cli.main import PLUGIN_COMMANDS, PLUGIN_MODULES, build_parser

    registered: dict[str, set[str]] = {}
    for name in PLUGIN_MODULES:
        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        if name == "agent.cli.models_site":  # joins the group models.cli makes
            importlib.import_module("models.cli").register(sub)
        importlib.import_module(name).register(sub)
        for command in sub.choices:
            registered.setdefault(command, set()).add(name)
    registered["model"] = {"models.cli", "agent.cli.models_site"}
    assert {c: set(m) for c, (_, m) in PLUGIN_COMMANDS.items()} == registered
    full = build_parser()
    action = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in action._choices_actions}
    assert {c: h for c, (h, _) in PLUGIN_COMMANDS.items()} == \
        {c: helps[c] for c in PLUGIN_COMMANDS}


@pytest.mark.parametrize("argv", [["model", "list"], ["i2c", "--help"], ["sensors", "drivers"]])
def test_a_command_gets_its_own_module_and_no_other(argv: list[str]) -> None:
    got = fresh(cli(argv) + "import sys\n"
                "result['firmware'] = 'firmware_bridge.cli' in sys.modules\n")
    assert got["rc"] in (0, 1) and got["firmware"] is False
