"""Fuzzing configuration files: `config check` and a reload on a running agent, with hostile
files (``tests.hostile_toml``). Whatever the file, `config check` exits 0 or 2 with one line per
problem and never a traceback, and a running agent survives a reload of it: it either runs the
new config or keeps its generation and says why.

The default run keeps within CI's budget; ``FUZZ_EXAMPLES=N`` scales it up (the ``slow`` test
runs four times as many)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli.main import main
from agent.config.load import load_config
from agent.runtime import Agent
from tests.broker import Mosquitto
from tests.hostile_toml import base_config, hostile_file, render
from tests.waiting import until_sync

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
STATE = Path(tempfile.mkdtemp(prefix="ea-fuzz-", dir="/tmp"))  # short: socket paths
atexit.register(shutil.rmtree, STATE, True)
CHECKED = STATE / "agent.toml"


def config_check(path: Path) -> tuple[int, str, str]:
    """`edge-agent config check` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["config", "check", str(path)])
    return rc, out.getvalue(), err.getvalue()


def assert_clean_verdict(path: Path, rc: int, out: str, err: str) -> None:
    assert rc in (0, 2), (rc, out, err)
    assert "Traceback" not in out + err
    if rc == 2:
        lines = err.splitlines()
        assert lines and all(line.startswith(f"{path}: ") for line in lines), err[:2000]
        assert all(len(line) < 2000 for line in lines), "values are shown shortened"
    else:
        assert out.startswith(f"{path}: ok") and not err


def _check_bytes(data: bytes) -> None:
    CHECKED.write_bytes(data)
    assert_clean_verdict(CHECKED, *config_check(CHECKED))


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(hostile_file(STATE))
def test_config_check_gives_a_verdict_on_any_file(data: bytes) -> None:
    _check_bytes(data)


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 4, deadline=None, database=None)
@given(hostile_file(STATE))
def test_config_check_gives_a_verdict_on_any_file_long_run(data: bytes) -> None:
    _check_bytes(data)


def test_a_valid_file_cut_at_every_offset() -> None:
    data = render(base_config(STATE)).encode()
    assert "ß".encode() in data  # so some cuts split a multi-byte character
    verdicts = {0: 0, 2: 0}
    for end in range(len(data) + 1):
        CHECKED.write_bytes(data[:end])
        rc, out, err = config_check(CHECKED)
        assert_clean_verdict(CHECKED, rc, out, err)
        verdicts[rc] += 1
    assert rc == 0, "the whole file is valid"
    assert verdicts[2] > len(data) // 2


@pytest.mark.parametrize("name, data", [
    ("deep", render(base_config(STATE)).replace('clock = "trust"',
                                                "x = " + "[" * 10_000 + "]" * 10_000)),
    ("huge int", render(base_config(STATE)).replace("3600", "9" * 5000)),
    ("latin-1", render(base_config(STATE))),
])
def test_config_check_as_a_process(name: str, data: str) -> None:
    path = STATE / f"proc-{name.replace(' ', '-')}.toml"
    path.write_bytes(data.encode("latin-1" if name == "latin-1" else "utf-8"))
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", "config", "check", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and done.stderr.startswith(f"{path}: ")


# -- reload on a running agent ----------------------------------------------------------------

class AgentThread:
    """An agent running on its own event loop in a thread, for a synchronous fuzz test."""

    def __init__(self, path: Path) -> None:
        self.agent = Agent(load_config(path), config_path=path)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fuzzed-agent", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.agent.run(install_signals=False))
        except BaseException as exc:  # the test asserts there is none
            self.error = exc

    def start(self) -> None:
        self.thread.start()
        until_sync(self.agent.ready.is_set, 20, what="agent ready")

    def reload(self) -> None:
        self.loop.call_soon_threadsafe(self.agent.request_reload)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.agent.request_stop)
        self.thread.join(20)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzzed_agent(mosquitto: Mosquitto) -> Iterator[tuple[AgentThread, Path]]:
    state = Path(tempfile.mkdtemp(prefix="ea-fz-", dir="/tmp"))
    path = state / "agent.toml"
    good = render(base_config(state, mosquitto.port))
    path.write_text(good)
    runner = AgentThread(path)
    runner.start()
    try:
        yield runner, path
    finally:
        runner.stop()
        shutil.rmtree(state, ignore_errors=True)
        assert runner.error is None, runner.error


@settings(max_examples=max(10, EXAMPLES // 5), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_reload_of_any_file_keeps_the_agent_running(
        fuzzed_agent: tuple[AgentThread, Path], data: st.DataObject) -> None:
    runner, path = fuzzed_agent
    agent = runner.agent
    content = data.draw(hostile_file(path.parent))
    before = (agent.generation, agent.reloads_ok, agent.reloads_rejected)
    path.write_bytes(content)
    runner.reload()
    until_sync(lambda: (agent.reloads_ok, agent.reloads_rejected) != before[1:], 30,
             what="the reload's verdict")
    assert runner.thread.is_alive() and runner.error is None
    if agent.reloads_rejected > before[2]:
        assert agent.last_reload_error, "a refusal says why"
        assert agent.generation == before[0], "a refused reload keeps the running generation"
    else:
        assert agent.generation == before[0] + 1
    until_sync(lambda: agent.pipeline is not None, 20, what="a pipeline running")
    # Back to the known-good file for the next example.
    path.write_text(render(base_config(path.parent, agent.cfg.mqtt.port)))
