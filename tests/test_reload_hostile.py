"""A reload never ends the agent: whatever the new file holds, the running generation keeps
going unless the new one is built and running, and the reason reaches the log and the caller."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import main
from agent.config.load import load_config
from agent.config.schema import AgentConfig
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until, write_toml


def _config(tmp_path: Path, port: int) -> dict[str, Any]:
    return make_config(tmp_path, port,
                       sensors=[{"name": "a", "driver": "synthetic", "period_s": 0.02}],
                       streams=[{"name": "s", "sensors": ["a"], "window_s": 1}])


def _readings(agent: Any) -> int:
    return int(next(s for s in agent.snapshot()["sensors"] if s["name"] == "a")["readings"])


async def _still_producing(agent: Any) -> None:
    n = _readings(agent)
    await until(lambda: _readings(agent) > n + 5, what="the running generation producing")


def _hostile_files(tmp_path: Path, good: str) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a piece of the reason the caller must get)."""
    return {
        "latin-1": (good.replace('id = "gw-test"', 'id = "gw-test"\nsite = "Stra\xdfe"')
                    .encode("latin-1"), "not UTF-8: byte offset"),
        "deep arrays": ((good + "\n[extra]\nx = " + "[" * 10_000 + "]" * 10_000 + "\n").encode(),
                        "nested too deeply"),
        "huge integer": ((good.replace("[runtime]", "[runtime]\nqueue_size = " + "9" * 5000))
                         .encode(), "more digits"),
        "nan": (good.replace("[runtime]", "[runtime]\nstop_timeout_s = nan").encode(),
                "runtime.stop_timeout_s"),
        "truncated": (good[: good.index("[mqtt]") + 4].encode(), "not valid TOML"),
        "model file is a device": ((good + '\n[[models]]\nname = "traffic"\nstream = "s"\n'
                                    'path = "/dev/zero"\n').encode(), "models[0].path"),
        "outbox is someone's file": (good.replace(
            str(tmp_path / "outbox.db"), str(tmp_path / "notes.txt")).encode(), "outbox.path"),
    }


async def test_hostile_reloads_are_refused_and_the_agent_keeps_running(
        tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    data = _config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    good = path.read_text()
    (tmp_path / "notes.txt").write_text("keep me\n")
    async with running_agent(data, config_path=path) as agent:
        for n, (name, (content, reason)) in enumerate(_hostile_files(tmp_path, good).items(), 1):
            caplog.clear()
            path.write_bytes(content)
            agent.request_reload()
            await until(lambda n=n: agent.reloads_rejected == n, what=f"{name} rejected")
            assert reason in agent.last_reload_error, (name, agent.last_reload_error)
            assert any(r.levelno == logging.ERROR and reason in r.getMessage()
                       for r in caplog.records), name
            assert agent.generation == 1 and agent.reloads_ok == 0
            await _still_producing(agent)
        assert (tmp_path / "notes.txt").read_text() == "keep me\n"
        path.write_text(good.replace('period_s = 0.02', 'period_s = 0.05'))
        agent.request_reload()
        await until(lambda: agent.reloads_ok == 1, what="a good reload after the bad ones")
        assert agent.generation == 2 and agent.last_reload_error == ""


async def test_any_exception_from_the_loader_is_a_refusal(tmp_path: Path,
                                                          broker: Mosquitto) -> None:
    data = _config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    raised = iter([RecursionError("maximum recursion depth exceeded"), MemoryError(),
                   KeyError("x"), OSError(5, "Input/output error")])

    def loader(p: str | Path) -> AgentConfig:
        raise next(raised)

    async with running_agent(data, config_path=path, loader=loader) as agent:
        for n, name in enumerate(["RecursionError", "MemoryError", "KeyError", "OSError"], 1):
            agent.request_reload()
            await until(lambda n=n: agent.reloads_rejected == n, what=f"{name} refused")
            assert name in agent.last_reload_error
            assert agent.generation == 1
        await _still_producing(agent)


async def test_a_config_that_cannot_start_brings_the_previous_one_back(
        tmp_path: Path, broker: Mosquitto) -> None:
    """It builds, but its outbox cannot be created (a directory nobody can make, even root):
    the new generation fails before it runs and the previous config runs again."""
    data = _config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    async with running_agent(data, config_path=path) as agent:
        bad = _config(tmp_path, broker.port)
        bad["outbox"]["path"] = "/proc/edge-agent-no-such-dir/outbox.db"
        write_toml(path, bad)
        agent.request_reload()
        await until(lambda: agent.reloads_rejected == 1, what="failed start reported")
        assert "failed to start" in agent.last_reload_error
        assert "previous one again" in agent.last_reload_error
        await until(lambda: agent.pipeline is not None and agent.pipeline.supervisors
                    and agent.cfg.outbox.path == str(tmp_path / "outbox.db"),
                    what="previous config running")
        assert agent.reloads_ok == 0
        await _still_producing(agent)


async def test_edge_agent_reload_tells_the_caller_why(tmp_path: Path, broker: Mosquitto,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = _config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    sock = load_config(path).control.socket
    async with running_agent(data, config_path=path) as agent:
        await until(lambda: agent.control is not None and agent.control.listening.is_set(),
                    what="control socket")
        path.write_bytes(path.read_bytes().replace(b'"gw-test"', b'"gw-test"\nsite = "\xdf"'))
        rc = await asyncio.wait_for(
            asyncio.to_thread(main, ["reload", "--socket", sock, "--wait", "15"]), 30)
        err = capsys.readouterr().err
        assert rc == 1
        assert "reload rejected" in err and "not UTF-8: byte offset" in err
        assert "Traceback" not in err
        assert agent.generation == 1
