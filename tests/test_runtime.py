"""The agent runtime: supervision inside the agent, reload, signals, sd_notify."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.broker import Mosquitto
from tests.harness import (
    make_config,
    running_agent,
    start_agent_process,
    stop_process,
    until,
    write_toml,
)


def _synthetic(name: str, **options: object) -> dict[str, object]:
    return {"name": name, "driver": "synthetic", "period_s": 0.02, "options": dict(options)}


def _sensor(agent, name: str) -> dict:
    return next(s for s in agent.snapshot()["sensors"] if s["name"] == name)


async def test_crashing_sensor_is_restarted_and_reported_in_agent(tmp_path: Path,
                                                                   broker: Mosquitto) -> None:
    data = make_config(
        tmp_path, broker.port,
        sensors=[_synthetic("steady"), _synthetic("crashy", fail_after=5)],
        streams=[{"name": "s", "sensors": ["steady", "crashy"], "window_s": 1}],
        runtime={"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "health_period_s": 3600})
    async with running_agent(data) as agent:
        await until(lambda: _sensor(agent, "crashy")["restarts"] >= 3, what="crashy restarts")
        before = _sensor(agent, "steady")["readings"]
        await until(lambda: _sensor(agent, "crashy")["restarts"] >= 5)
        steady = _sensor(agent, "steady")
        crashy = _sensor(agent, "crashy")
        assert steady["readings"] > before, "the healthy sensor stopped producing"
        assert steady["failures"] == 0 and steady["state"] == "up"
        assert crashy["failures"] >= 5
        assert "injected failure" in crashy["last_error"]


async def test_sighup_with_invalid_config_keeps_old_config(tmp_path: Path,
                                                           broker: Mosquitto) -> None:
    data = make_config(tmp_path, broker.port, sensors=[_synthetic("a")],
                       streams=[{"name": "s", "sensors": ["a"], "window_s": 1}])
    path = write_toml(tmp_path / "agent.toml", data)
    async with running_agent(data, config_path=path) as agent:
        path.write_text(path.read_text().replace('driver = "synthetic"', 'driver = "nonesuch"'))
        agent.request_reload()
        await until(lambda: agent.reloads_rejected == 1, what="reload rejected")
        assert "sensors[0].driver" in agent.last_reload_error
        assert agent.generation == 1
        n = _sensor(agent, "a")["readings"]
        await until(lambda: _sensor(agent, "a")["readings"] > n + 5, what="old config producing")

        data["sensors"].append(_synthetic("b"))
        data["streams"][0]["sensors"].append("b")
        write_toml(path, data)
        agent.request_reload()
        await until(lambda: agent.generation == 2 and agent.pipeline is not None
                    and len(agent.pipeline.supervisors) == 2, what="valid reload")
        await until(lambda: _sensor(agent, "b")["readings"] > 0, what="new sensor producing")
        assert agent.reloads_ok == 1


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(15.0)
    return s, path


def _recv_until(sock: socket.socket, needle: str, timeout_s: float = 15.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(msg)
        if needle in msg:
            return got
    raise AssertionError(f"{needle!r} not received; got {got}")


@pytest.mark.slow
def test_sd_notify_and_signals_in_a_real_process(tmp_path: Path, broker: Mosquitto) -> None:
    data = make_config(tmp_path, broker.port, sensors=[_synthetic("a")],
                       streams=[{"name": "s", "sensors": ["a"], "window_s": 1}])
    cfg = write_toml(tmp_path / "agent.toml", data)
    sock, path = _notify_socket(tmp_path)
    proc = start_agent_process(cfg, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
                               log=tmp_path / "agent.log")
    try:
        _recv_until(sock, "READY=1")
        watchdogs = _recv_until(sock, "WATCHDOG=1")
        _recv_until(sock, "WATCHDOG=1")
        assert all("STOPPING" not in m for m in watchdogs)

        # A real SIGHUP with a broken file: rejected, the process keeps running and says so.
        cfg.write_text(cfg.read_text().replace("[gateway]", "[gateway]\nbogus = 1"))
        proc.send_signal(signal.SIGHUP)
        msgs = _recv_until(sock, "reload rejected")
        assert any("RELOADING=1" in m for m in msgs)
        assert proc.poll() is None
        _recv_until(sock, "WATCHDOG=1")  # still alive and making progress

        rc, took = stop_process(proc, signal.SIGTERM)
        assert rc == 0
        assert took < 5.0
        _recv_until(sock, "STOPPING=1", timeout_s=1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        sock.close()
    log = (tmp_path / "agent.log").read_text()
    assert "gateway.bogus: unknown key" in log


@pytest.mark.slow
async def test_sigterm_under_load_exits_0_in_time_with_everything_flushed(
        tmp_path: Path, broker: Mosquitto) -> None:
    import asyncio
    import json

    import aiomqtt

    streams = [{"name": f"s{i}", "sensors": [f"load{i}"], "window_s": 1} for i in range(3)]
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": f"load{i}", "driver": "synthetic", "period_s": 0.005,
                  "options": {"burst": 20}} for i in range(3)],
        streams=streams)
    cfg = write_toml(tmp_path / "agent.toml", data)
    got: dict[int, dict] = {}
    ready = asyncio.Event()

    async def subscribe() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="flush-check",
                                  clean_session=False) as c:
            await c.subscribe("t/gw-test/telemetry/#", qos=1)
            ready.set()
            async for msg in c.messages:
                doc = json.loads(msg.payload)  # type: ignore[arg-type]
                got[doc["seq"]] = doc

    sub = asyncio.create_task(subscribe())
    await asyncio.wait_for(ready.wait(), 10)
    sock, path = _notify_socket(tmp_path)
    proc = start_agent_process(cfg, env={"NOTIFY_SOCKET": path}, log=tmp_path / "a.log")
    try:
        await asyncio.to_thread(_recv_until, sock, "READY=1")
        await until(lambda: len(got) >= 6, timeout_s=20, what="windows under load")
        rc, took = await asyncio.to_thread(stop_process, proc, signal.SIGTERM)
        assert rc == 0, (tmp_path / "a.log").read_text()[-2000:]
        assert took < 5.0
        # Whatever the uplink had no time to send is in the outbox: a second run (no sensors)
        # publishes it. Then every window accepted by the first run has arrived, with no gap.
        write_toml(cfg, {**data, "sensors": [], "streams": []})
        proc = start_agent_process(cfg, log=tmp_path / "b.log")
        await until(lambda: any("partial" in d["flags"] for d in got.values())
                    and _contiguous(got), timeout_s=20, what="flushed windows")
        seqs = sorted(got)
        assert seqs == list(range(seqs[0], seqs[-1] + 1))
        # The open windows were flushed at SIGTERM: one partial window per stream.
        partial = {d["stream"] for d in got.values() if "partial" in d["flags"]}
        assert partial == {"s0", "s1", "s2"}
        assert sum(d["channels"][f"load{d['stream'][1]}.temperature"]["count"]
                   for d in got.values()) > 1000
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        sub.cancel()
        await asyncio.gather(sub, return_exceptions=True)
        sock.close()


def _contiguous(got: dict[int, dict]) -> bool:
    seqs = sorted(got)
    return bool(seqs) and seqs == list(range(seqs[0], seqs[-1] + 1))
