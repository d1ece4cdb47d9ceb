"""The CLI in normal use ends without a traceback: Ctrl-C (SIGINT) exits 130, a reader that
goes away (`| head`) ends the command with 0, an unknown `tail` name exits 2 with the known
names, and `tail --json` writes strict JSON. Each case is a real subprocess."""

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

DEMO_TOML = Path(__file__).resolve().parent.parent / "agent" / "examples" / "demo.toml"


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
