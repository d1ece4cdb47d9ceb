"""The CLI in normal use ends without a traceback: Ctrl-C (SIGINT) exits 130, a reader that
goes away (`| head`) ends the command with 0, an unknown `tail` name exits 2 with the known
names, and every command that prints has `--json` whose output is strict JSON (a walk over the
parser fails when a new command lacks it, or lacks a case here). Each case is a real
subprocess, and none may print a traceback."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.waiting import until, until_sync

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOML = ROOT / "agent" / "examples" / "demo.toml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path.cwd())
    return env


def _spawn(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "agent.cli.main", *argv], env=_env(),
                            **kw)  # type: ignore[call-overload]


def _holds(proc: subprocess.Popen[bytes], path: str) -> bool:
    """Whether the process has ``path`` open (it has opened the port)."""
    try:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{proc.pid}/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def _interrupt(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    assert proc.poll() is None, "the command ended before it was interrupted"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise AssertionError("the command did not end on SIGINT") from None
    return proc.returncode, err.decode("utf-8", "replace")


def test_ctrl_c_on_serial_sniff() -> None:
    proc = _spawn(["serial", "sniff", "emulated", "--driver", "pms5003", "--duration", "300"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # a frame from the emulator: the sniffer is running
    assert b"PM2.5" in first, first
    rc, err = _interrupt(proc)
    assert rc == 130 and "Traceback" not in err, err


def test_ctrl_c_on_sensors_read_with_count(tmp_path: Path) -> None:
    master, slave = os.openpty()
    port = os.ttyname(slave)
    config = tmp_path / "agent.toml"
    config.write_text(f'[gateway]\nid = "gw-1"\n\n[[sensors]]\nname = "pm"\n'
                      f'driver = "pms5003"\nport = "{port}"\n')
    try:
        proc = _spawn(["sensors", "read", "pm", "-c", str(config), "--count", "1000",
                       "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        until_sync(lambda: _holds(proc, port) or proc.poll() is not None, 60, "the port to open")
        rc, err = _interrupt(proc)
    finally:
        os.close(master)
        os.close(slave)
    assert rc == 130 and "Traceback" not in err, err


def test_ctrl_c_on_demo(tmp_path: Path) -> None:
    proc = _spawn(["demo", "--duration", "600", "--state-dir", str(tmp_path)],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while True:  # the first line of the feed: the pipeline is up
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, "the demo printed no feed"
        if line.strip():
            break
    rc, err = _interrupt(proc)
    assert rc == 130 and "Traceback" not in err, err




async def test_ctrl_c_on_tail(agent_sock) -> None:
    agent, path = agent_sock
    proc = _spawn(["tail", "--socket", str(path)], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    hub = agent.pipeline.tail
    await until(lambda: hub.active or proc.poll() is not None, 60, "tail to subscribe")
    assert proc.poll() is None, "tail exited before it subscribed"
    rc, err = await asyncio.to_thread(_interrupt, proc)
    assert rc == 130 and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["status", "--json"], ["status"], ["outbox", "stats"],
                                  ["outbox", "stats", "--json"]])
async def test_a_reader_that_left_ends_the_command_quietly(agent_sock, argv) -> None:
    _, path = agent_sock
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already exited: every write fails with EPIPE
    try:
        proc = _spawn([*argv, "--socket", str(path)], stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err_b = await asyncio.to_thread(proc.communicate, None, 60)
    err = err_b.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


async def test_tail_of_an_unknown_name_lists_the_known_ones(agent_sock) -> None:
    _, path = agent_sock
    proc = _spawn(["tail", "nosuch", "--socket", str(path)], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    _, err_b = await asyncio.to_thread(proc.communicate, None, 60)
    err = err_b.decode()
    assert proc.returncode == 2, err
    assert "no sensor, stream or model named 'nosuch'" in err
    assert "sensors bme, radar" in err and "models traffic" in err
    assert "Traceback" not in err


async def test_tail_of_a_known_name_follows_it(agent_sock) -> None:
    agent, path = agent_sock
    proc = _spawn(["tail", "bme", "--json", "--count", "1", "--socket", str(path)],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hub = agent.pipeline.tail
    await until(lambda: hub.active or proc.poll() is not None, 60, "tail to subscribe")
    assert proc.poll() is None, proc.stderr.read()
    hub.publish("reading", "bme", {"quantity": "temperature", "value": math.nan,
                                   "unit": "degC", "extra": [math.inf, -math.inf, 1.5]})
    out, err = await asyncio.to_thread(proc.communicate, None, 60)
    assert proc.returncode == 0, err

    def strict(token: str) -> None:
        raise AssertionError(f"bare {token} in the JSON output")

    item = json.loads(out, parse_constant=strict)
    assert item["value"] is None and item["extra"] == [None, None, 1.5]
    assert item["name"] == "bme"


# -- --json on every command ------------------------------------------------------------------

# Commands without --json, and why: their output is not a result a script would parse.
NO_JSON = {
    "run": "the agent in the foreground: its output is the log (--log-format json)",
    "demo": "a live view of the feed for a person; the feed itself is JSON on MQTT",
    "config reference": "prints the Markdown reference document",
    "model train": "its result is the model files and their manifests (JSON) in --out",
    "completion": "prints a shell script",
}
# Commands whose --json case needs a live stream and is a test of its own above.
COVERED = {"tail": "test_tail_of_a_known_name_follows_it"}

EMULATED_PMS = ["--driver", "pms5003", "--count", "1", "--duration", "60"]
# (command, argv after it, exit code). {sock}: the agent's socket, {tmp}: a fresh directory.
JSON_CASES: list[tuple[str, list[str], int]] = [
    ("version", [], 0),
    ("config check", [str(DEMO_TOML)], 0),
    ("config check", ["{tmp}/missing.toml"], 2),
    ("sensors read", ["env", "-c", str(DEMO_TOML)], 0),
    ("sensors read", ["env", "-c", "{tmp}/missing.toml"], 2),
    ("sensors drivers", [], 0),
    ("sensors list", ["--socket", "{sock}"], 0),
    ("status", ["--socket", "{sock}"], 0),
    ("status", ["--socket", "{tmp}/nobody.sock"], 3),
    ("reload", ["--socket", "{sock}"], 0),
    ("outbox stats", ["--socket", "{sock}"], 0),
    ("outbox export", ["{tmp}/export.jsonl", "--socket", "{sock}"], 0),
    ("i2c scan", ["--bus", "emulated"], 0),
    ("i2c scan", ["--bus", "250"], 1),
    ("serial ports", [], 0),
    ("serial sniff", ["emulated", *EMULATED_PMS, "--hex"], 0),
    ("pzem reset-energy", ["{tmp}/gone", "--address", "1", "--yes"], 1),
    ("pzem reset-energy", ["{tmp}/gone", "--address", "1"], 2),  # no terminal, no --yes
    ("modbus scan", ["tcp://127.0.0.1:1", "--units", "1", "--timeout", "0.2"], 1),
    ("modbus read", ["tcp://127.0.0.1:1", "--unit", "1", "--address", "0", "--count", "1"], 1),
    ("profiles list", [], 0),
    ("profiles show", ["pzem-004t-v3"], 0),
    ("model list", [], 0),
    ("model test", ["energy"], 0),
    ("model verify", [str(ROOT / "models" / "traffic.onnx")], 0),
    ("model verify", [str(ROOT / "models" / "traffic.json")], 1),
    ("model history export", ["--db", "{tmp}/none.db", "-o", "{tmp}/h.csv"], 1),
    ("model activate", ["traffic", "--socket", "{sock}"], 1),
    ("firmware info", ["emulated"], 0),
    ("firmware pack", ["{tmp}/body.bin", "{tmp}/image.bin", "--version", "1.2.3"], 0),
    ("firmware flash", ["emulated", "{tmp}/image.bin", "--allow-unsigned"], 0),
    ("firmware flash", ["emulated", "{tmp}/image.bin"], 2),  # unsigned: refused
    ("firmware flash", ["emulated", "{tmp}/missing.bin"], 2),
    ("install-service", ["--root", "{tmp}/root", "--dry-run", "--exec", "/usr/bin/edge-agent"],
     0),
    ("uninstall-service", ["--root", "{tmp}/root", "--dry-run"], 0),
    ("sharing show", ["-c", str(DEMO_TOML)], 0),
]


def _leaves() -> dict[str, set[str]]:
    """Every command of the full parser (``"model list"``) with its options."""
    import argparse

    from agent.cli.main import build_parser

    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[" ".join(path)] = {o for a in parser._actions for o in a.option_strings}
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*path, name])

    walk(build_parser(None), [])
    return out


def test_every_printing_command_has_json_and_a_case_here() -> None:
    leaves = _leaves()
    assert len(leaves) > 30  # the whole tree, plugin modules included
    lacking = sorted(c for c, opts in leaves.items() if "--json" not in opts and c not in NO_JSON)
    assert not lacking, f"commands without --json: {lacking}"
    untested = sorted(set(leaves) - {c for c, _, _ in JSON_CASES} - set(NO_JSON) - set(COVERED))
    assert not untested, f"commands with no --json case in this module: {untested}"
    assert set(NO_JSON) | set(COVERED) <= set(leaves), "a listed command no longer exists"
    assert all(name in globals() for name in COVERED.values())


@pytest.mark.parametrize(("command", "argv", "code"), JSON_CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(JSON_CASES)])
async def test_json_output_is_strict_and_no_traceback(agent_sock, tmp_path: Path, command: str,
                                                      argv: list[str], code: int) -> None:
    from firmware_bridge.image import build_image

    _, sock = agent_sock
    (tmp_path / "body.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "image.bin").write_bytes(build_image((1, 2, 3), bytes(range(256)) * 8))
    args = [a.format(sock=sock, tmp=tmp_path) for a in argv]
    proc = _spawn([*command.split(), *args, "--json"], stdin=subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_b, err_b = await asyncio.to_thread(proc.communicate, None, 120)
    out, err = out_b.decode(), err_b.decode()
    assert "Traceback" not in err, err
    assert proc.returncode == code, (out, err)

    def strict(token: str) -> None:
        raise AssertionError(f"bare {token} in the JSON output")

    # One document, or one per line for the streaming commands; a failure may say why on
    # stderr only, but what is on stdout is JSON.
    docs = ([json.loads(line, parse_constant=strict) for line in out.splitlines()]
            if command == "serial sniff" else [json.loads(out, parse_constant=strict)]
            if out.strip() else [])
    assert docs or code != 0, "no output"


# -- a running demo is found ---------------------------------------------------------------------

def test_socket_commands_find_a_running_demo(tmp_path: Path) -> None:
    from agent.control.client import DEFAULT_SOCKET
    from tests.test_control import short_dir

    if os.path.exists(DEFAULT_SOCKET):
        pytest.skip(f"an installed agent listens on {DEFAULT_SOCKET} here")
    env = {**_env(), "XDG_RUNTIME_DIR": str(tmp_path)}
    with short_dir() as state:
        demo = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "demo", "--quiet",
                                 "--duration", "600", "--state-dir", str(state)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert demo.stdout is not None
            said = [demo.stdout.readline().decode() for _ in range(2)]
            assert f"control socket {state / 'control.sock'}" in said[1], said

            def cli(*argv: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "agent.cli.main", *argv],
                                      env=env, capture_output=True, text=True, timeout=120,
                                      check=False)

            until_sync(lambda: cli("status", "--json").returncode == 0, 120,
                       "status to reach the demo")
            status = cli("status", "--json")
            assert json.loads(status.stdout)["agent"]["config_file"] is None
            assert f"using the demo's, {state / 'control.sock'}, pid {demo.pid}" in status.stderr
            stats = cli("outbox", "stats")
            assert stats.returncode == 0 and "rows" in stats.stdout, stats.stderr
            reload = cli("reload")
            assert reload.returncode == 1 and "Traceback" not in reload.stderr
            assert "not started from a config file" in reload.stderr, reload.stderr
        finally:
            demo.send_signal(signal.SIGINT)
            _, err = demo.communicate(timeout=60)
        assert demo.returncode == 130 and "Traceback" not in err.decode()
    gone = subprocess.run([sys.executable, "-m", "agent.cli.main", "status"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert gone.returncode == 3 and "edge-agent demo" in gone.stderr, gone.stderr
    assert not list(tmp_path.glob("edge-agent-demo-*.json"))  # the demo withdrew its record
