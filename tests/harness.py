"""Run the agent in-process or as a subprocess, from a config, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.config.load import parse_config
from agent.config.schema import AgentConfig
from agent.runtime import Agent
from tests.waiting import until

__all__ = ["feed_of", "make_config", "running_agent", "start_agent_process", "stop_process",
           "until", "write_toml"]

ROOT = Path(__file__).resolve().parent.parent


def make_config(tmp: Path, port: int, **sections: Any) -> dict[str, Any]:
    """A minimal config dict on the given loopback broker port, state in ``tmp``."""
    data: dict[str, Any] = {
        "gateway": {"id": "gw-test"},
        "sensors": [],
        "streams": [],
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "t"},
        "outbox": {"path": str(tmp / "outbox.db"), "commit_interval_ms": 50},
        "control": {"socket": str(tmp / "control.sock")},
        "runtime": {"health_period_s": 3600, "clock": "trust"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A tiny TOML writer for test configs (tables, arrays of tables, scalars, inline lists)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {scalar(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {scalar(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {scalar(v)}" for k, v in item.items()]
        elif isinstance(value, list):
            continue  # an empty array of tables
        else:
            raise TypeError(f"top-level {key}")
        lines.append("")
    path.write_text("\n".join(lines))
    tomllib.loads(path.read_text())  # fail here, not in the agent, on a writer bug
    return path


@contextlib.asynccontextmanager
async def feed_of(port: int, topic: str, identifier: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Every JSON payload a cloud subscriber receives on ``topic`` during the block, in order
    (subscribed before the block starts)."""
    import json

    import aiomqtt

    got: list[dict[str, Any]] = []
    ready = asyncio.Event()

    async def subscribe() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=identifier) as c:
            await c.subscribe(topic, qos=1)
            ready.set()
            async for msg in c.messages:
                got.append(json.loads(msg.payload))  # type: ignore[arg-type]

    sub = asyncio.create_task(subscribe(), name=f"feed:{identifier}")
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield got
    finally:
        sub.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub


@contextlib.asynccontextmanager
async def running_agent(data: dict[str, Any], config_path: Path | None = None,
                        **kwargs: Any) -> AsyncIterator[Agent]:
    """An Agent running in this event loop until the block ends (then stopped, flushed)."""
    cfg: AgentConfig = parse_config(data)
    agent = Agent(cfg, config_path=config_path, **kwargs)
    task = asyncio.create_task(agent.run(install_signals=False), name="agent-under-test")
    try:
        await asyncio.wait_for(agent.ready.wait(), 20)
        yield agent
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 20)



def start_agent_process(config: Path, env: dict[str, str] | None = None,
                        log: Path | None = None) -> subprocess.Popen[bytes]:
    """``edge-agent run -c config`` as a child process."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "agent.cli.main", "run", "-c", str(config),
                             "--log-format", "text"], stdout=out, stderr=subprocess.STDOUT,
                            env=full_env, cwd=ROOT)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout_s: float = 10.0) -> tuple[int, float]:
    """Send ``sig``; return (exit code, seconds it took to exit)."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout_s)
    return rc, time.monotonic() - t0


class SteppedClock:
    """Wall time set by the test (a simulated day, a played-in history); monotonic time moves
    with it, so timers and windows follow the test's time."""

    def __init__(self, wall_ns: int) -> None:
        self.now = wall_ns
        self._offset = time.monotonic_ns() - wall_ns

    def wall_ns(self) -> int:
        return self.now

    def mono_ns(self) -> int:
        return self.now + self._offset

    def synced(self) -> bool:
        return True
