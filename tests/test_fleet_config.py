"""config.apply / config.rollback: the real agent, a real mosquitto, a config file on disk."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from agent.config.load import load_config
from agent.fleet.config_files import DeployRecord
from tests.broker import Mosquitto
from tests.harness import (
    feed_of,
    make_config,
    running_agent,
    start_agent_process,
    stop_process,
    write_toml,
)
from tests.waiting import until

GW = "gw-test"
TIMEOUT_S = 4.0  # the trial's health timeout in these tests


def _synthetic(name: str) -> dict[str, object]:
    return {"name": name, "driver": "synthetic", "period_s": 0.02}


def base_config(tmp: Path, port: int, **extra: Any) -> dict[str, Any]:
    return make_config(
        tmp, port, sensors=[_synthetic("a")],
        streams=[{"name": "s", "sensors": ["a"], "window_s": 1}],
        commands={"require_signature": False, "apply_health_timeout_s": TIMEOUT_S},
        runtime={"health_period_s": 0.5, "clock": "trust", "backoff_initial_s": 0.05,
                 "backoff_max_s": 0.2}, **extra)


def toml_text(tmp: Path, data: dict[str, Any]) -> str:
    return write_toml(tmp / "scratch.toml", data).read_text()


@contextlib.asynccontextmanager
async def replies(port: int) -> AsyncIterator[list[dict[str, Any]]]:
    async with feed_of(port, f"t/{GW}/cmd/+/result", "cloud-results") as got:
        yield got


async def send(port: int, name: str, req_id: str, args: dict[str, Any]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"cloud-{req_id}") as c:
        await c.publish(f"t/{GW}/cmd/{name}", json.dumps({"id": req_id, "args": args}), qos=1)


def reply_to(got: list[dict[str, Any]], req_id: str) -> dict[str, Any] | None:
    return next((r for r in got if r.get("id") == req_id), None)


def health_states(feed: list[dict[str, Any]]) -> list[str]:
    sections = [m.get("health", {}).get("config_apply") for m in feed]
    return [c["state"] for c in sections if isinstance(c, dict) and "state" in c]


async def test_a_good_config_is_confirmed_and_stays(tmp_path: Path, broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    new = base_config(tmp_path, broker.port)
    new["sensors"].append(_synthetic("b"))
    new["streams"][0]["sensors"].append("b")
    new_text = toml_text(tmp_path, new)
    async with (running_agent(data, config_path=path) as agent,
                replies(broker.port) as got,
                feed_of(broker.port, f"t/{GW}/health", "cloud-health") as health):
        await send(broker.port, "config.apply", "apply-1", {"config": new_text})
        await until(lambda: reply_to(got, "apply-1") is not None, what="immediate reply")
        first = reply_to(got, "apply-1")
        assert first is not None and first["ok"], first
        assert first["result"]["state"] == "trial"
        changes = first["result"]["changes"]
        assert changes["sections"] == ["sensors", "streams"]
        assert "streams[0].sensors" in changes["keys"]
        assert first["result"]["restart_needed"] == []
        deployment = first["result"]["deployment"]

        await until(lambda: reply_to(got, deployment) is not None, TIMEOUT_S + 10,
                    what="the outcome on cmd/config.apply/result")
        outcome = reply_to(got, deployment)
        assert outcome is not None and outcome["ok"] and outcome["name"] == "config.apply"
        assert outcome["result"]["state"] == "confirmed"
        assert outcome["result"]["changes"] == changes
        await until(lambda: "confirmed" in health_states(health), what="confirmed in health")

        assert path.read_text() == new_text
        assert (tmp_path / "agent.toml.previous").read_text() == original
        assert not (tmp_path / "agent.toml.candidate").exists()
        assert [s.name for s in agent.cfg.sensors] == ["a", "b"]
        # It stays: past the trial's deadline the new config still runs, nothing rolled back.
        gen = agent.generation
        record = tmp_path / "agent.toml.deploy.json"
        await until(lambda: DeployRecord.model_validate_json(record.read_text()).reported,
                    what="the outcome remembered as acknowledged")
        rec = DeployRecord.model_validate_json(record.read_text())
        assert rec.state == "confirmed"
        await until(lambda: time.time() > rec.started_ts + TIMEOUT_S + 0.5, TIMEOUT_S + 5,
                    what="the trial's deadline passed")
        assert agent.generation == gen and path.read_text() == new_text
        assert agent.snapshot()["config_apply"]["counts"]["rolled_back"] == 0


def broken_config(tmp: Path, port: int) -> dict[str, Any]:
    data = base_config(tmp, port)
    data["sensors"].append({"name": "radar", "driver": "ops243",
                            "port": str(tmp / "no-such-tty")})
    return data


async def test_sensors_that_cannot_come_up_roll_back_by_themselves(
        tmp_path: Path, broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    bad_text = toml_text(tmp_path, broken_config(tmp_path, broker.port))
    async with (running_agent(data, config_path=path) as agent,
                replies(broker.port) as got,
                feed_of(broker.port, f"t/{GW}/health", "cloud-health") as health):
        await send(broker.port, "config.apply", "apply-bad", {"config": bad_text})
        await until(lambda: reply_to(got, "apply-bad") is not None, what="immediate reply")
        first = reply_to(got, "apply-bad")
        assert first is not None and first["ok"] and first["result"]["state"] == "trial"
        deployment = first["result"]["deployment"]
        await until(lambda: path.read_text() == original, TIMEOUT_S + 10,
                    what="the previous file back in place")
        # Decided by the health timeout: not before it, and with the reason it gives.
        rec = DeployRecord.model_validate_json(
            (tmp_path / "agent.toml.deploy.json").read_text())
        assert rec.ended_ts is not None and rec.ended_ts - rec.started_ts >= TIMEOUT_S
        assert rec.reason.startswith(f"not healthy within {TIMEOUT_S:g} s: ")

        await until(lambda: reply_to(got, deployment) is not None, 15, what="the outcome")
        outcome = reply_to(got, deployment)
        assert outcome is not None and not outcome["ok"]
        assert outcome["result"]["state"] == "rolled_back"
        assert "sensor radar" in outcome["result"]["reason"]
        await until(lambda: "rolled_back" in health_states(health), what="rolled back in health")
        assert "trial" in health_states(health)
        await until(lambda: agent.generation == 3 and agent.generation_ready(),
                    what="the previous config running again")
        assert [s.name for s in agent.cfg.sensors] == ["a"]
        assert (tmp_path / "agent.toml.rejected").read_text() == bad_text
        assert not (tmp_path / "agent.toml.previous").exists()
        # One step back only: a second rollback has nothing to go back to.
        await send(broker.port, "config.rollback", "rb-1", {})
        await until(lambda: reply_to(got, "rb-1") is not None, what="rollback reply")
        rb = reply_to(got, "rb-1")
        assert rb is not None and not rb["ok"] and rb["error"]["code"] == "failed"


async def test_an_invalid_config_is_refused_with_the_checks_message(
        tmp_path: Path, broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    wrong_driver = base_config(tmp_path, broker.port)
    wrong_driver["sensors"][0]["driver"] = "nonesuch"
    async with running_agent(data, config_path=path) as agent, replies(broker.port) as got:
        await send(broker.port, "config.apply", "toml", {"config": "[gateway\nid = 1"})
        await send(broker.port, "config.apply", "driver",
                   {"config": toml_text(tmp_path, wrong_driver)})
        await send(broker.port, "config.apply", "huge", {"config": "#" * 60_000})
        await until(lambda: all(reply_to(got, i) for i in ("toml", "driver", "huge")),
                    what="three refusals")
        for req_id, code, needle in (("toml", "failed", "not valid TOML"),
                                     ("driver", "failed", "sensors[0].driver"),
                                     ("huge", "bad_args", "at most 49152 characters")):
            r = reply_to(got, req_id)
            assert r is not None and not r["ok"], r
            assert r["error"]["code"] == code and needle in r["error"]["message"], r
        assert path.read_text() == original
        assert not (tmp_path / "agent.toml.candidate").exists()
        assert not (tmp_path / "agent.toml.deploy.json").exists()
        assert agent.generation == 1 and agent.snapshot()["config_apply"]["counts"]["refused"] == 2


async def test_rollback_on_request_after_a_confirmed_apply(tmp_path: Path,
                                                           broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    new = base_config(tmp_path, broker.port)
    new["runtime"]["queue_size"] = 2048
    async with running_agent(data, config_path=path) as agent, replies(broker.port) as got:
        await send(broker.port, "config.apply", "a", {"config": toml_text(tmp_path, new)})
        await until(lambda: agent.snapshot()["config_apply"].get("state") == "confirmed",
                    TIMEOUT_S + 10, what="confirmed")
        await send(broker.port, "config.rollback", "r", {})
        await until(lambda: reply_to(got, "r") is not None, what="rollback reply")
        r = reply_to(got, "r")
        assert r is not None and r["ok"] and r["result"]["state"] == "rolled_back"
        await until(lambda: agent.cfg.runtime.queue_size != 2048 and agent.generation_ready(),
                    what="the previous config running")
        assert path.read_text() == original


async def test_a_restart_during_the_trial_rolls_an_unhealthy_config_back(
        tmp_path: Path, broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    bad_text = toml_text(tmp_path, broken_config(tmp_path, broker.port))
    async with running_agent(data, config_path=path) as agent, replies(broker.port) as got:
        await send(broker.port, "config.apply", "x", {"config": bad_text})
        await until(lambda: agent.generation == 2, what="the trial generation")
        assert reply_to(got, "x") is not None
    # Stopped mid-trial: the bad file is the config, the record says "trial".
    assert path.read_text() == bad_text
    record = DeployRecord.model_validate_json((tmp_path / "agent.toml.deploy.json").read_text())
    assert record.state == "trial"

    restarted = load_config(path)
    async with (replies(broker.port) as got,
                running_agent(restarted.model_dump(mode="json"), config_path=path) as agent):
        await until(lambda: path.read_text() == original, TIMEOUT_S + 10,
                    what="rolled back after the restart")
        await until(lambda: reply_to(got, record.deployment) is not None, 15,
                    what="the outcome after the restart")
        outcome = reply_to(got, record.deployment)
        assert outcome is not None and outcome["result"]["state"] == "rolled_back"
        await until(lambda: agent.generation == 2 and agent.generation_ready()
                    and [s.name for s in agent.cfg.sensors] == ["a"], what="previous running")


def _answered(got: list[dict[str, Any]], req_id: str) -> bool:
    return reply_to(got, req_id) is not None


async def _until_answering(port: int, got: list[dict[str, Any]]) -> None:
    """Ping until the agent (a process starting up) answers: its command subscription is up."""
    for n in range(60):
        await send(port, "ping", f"ping-{n}", {})
        with contextlib.suppress(AssertionError):
            await until(functools.partial(_answered, got, f"ping-{n}"), 1.0)
            return
    raise AssertionError("the agent never answered a ping")


async def test_kill_9_during_the_trial_and_the_restart_rolls_back(
        tmp_path: Path, broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    bad_text = toml_text(tmp_path, broken_config(tmp_path, broker.port))
    async with replies(broker.port) as got:
        proc = start_agent_process(path, log=tmp_path / "first.log")
        try:
            await _until_answering(broker.port, got)
            await send(broker.port, "config.apply", "k9", {"config": bad_text})
            await until(lambda: reply_to(got, "k9") is not None, 15, what="immediate reply")
            proc.kill()  # SIGKILL: no flush, no clean-up, mid-trial
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        first = reply_to(got, "k9")
        assert first is not None and first["result"]["state"] == "trial"
        deployment = first["result"]["deployment"]
        assert path.read_text() == bad_text

        proc = start_agent_process(path, log=tmp_path / "second.log")
        try:
            await until(lambda: path.read_text() == original, TIMEOUT_S + 20,
                        what="the restarted agent rolled the unhealthy config back")
            await until(lambda: reply_to(got, deployment) is not None, 20, what="the outcome")
            outcome = reply_to(got, deployment)
            assert outcome is not None and not outcome["ok"]
            assert outcome["result"]["state"] == "rolled_back"
            assert "sensor radar" in outcome["result"]["reason"]
            rc, _ = stop_process(proc)
            assert rc == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert "on trial again" in (tmp_path / "second.log").read_text()


async def test_unsigned_config_apply_is_not_offered_while_signatures_are_required(
        tmp_path: Path, broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    data["commands"]["require_signature"] = True
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    new = base_config(tmp_path, broker.port)
    new["runtime"]["queue_size"] = 2048
    async with running_agent(data, config_path=path) as agent, replies(broker.port) as got:
        await send(broker.port, "config.apply", "u1", {"config": toml_text(tmp_path, new)})
        await until(lambda: reply_to(got, "u1") is not None, what="reply")
        r = reply_to(got, "u1")
        assert r is not None and not r["ok"], r
        if r["error"]["code"] == "unavailable":  # no signature check in this dispatcher
            assert agent.pipeline is not None
            assert "config.apply" not in agent.pipeline.commands.names
        else:  # a dispatcher that verifies: refused as unsigned
            assert "unsigned" in json.dumps(r["error"])
        assert path.read_text() == original and agent.generation == 1


async def test_hostile_config_text_is_refused_by_name_and_changes_nothing(
        tmp_path: Path, broker: Mosquitto) -> None:
    data = base_config(tmp_path, broker.port)
    path = write_toml(tmp_path / "agent.toml", data)
    original = path.read_text()
    hostile = {
        "huge_int": ("x = " + "9" * 5000 + "\n", "not valid TOML"),
        "deep": ("x = " + "[" * 5000 + "]" * 5000 + "\n", "config check:"),
        "nul": ("[gateway]\nid = \"a\x00b\"\n", "not valid TOML"),
        "wrong_type": ("gateway = 5\n", "gateway"),
        "not_toml": ("\x7fELF\x02\x01\x01", "not valid TOML"),
    }
    async with running_agent(data, config_path=path) as agent, replies(broker.port) as got:
        for req_id, (text, needle) in hostile.items():  # one at a time: 4 may run at once
            await send(broker.port, "config.apply", req_id, {"config": text})
            await until(lambda: reply_to(got, req_id) is not None,  # noqa: B023
                        what=f"the refusal of {req_id}")
            r = reply_to(got, req_id)
            assert r is not None and not r["ok"] and r["error"]["code"] == "failed", r
            assert needle in r["error"]["message"], (req_id, r["error"]["message"])
        # A lone surrogate (JSON "\ud800") never reaches the handler: the envelope refuses it.
        await send(broker.port, "config.apply", "surrogate", {"config": "id = '\ud800'"})
        await until(lambda: any(r["id"] is None for r in got), what="the malformed refusal")
        r = next(r for r in got if r["id"] is None)
        assert r["error"]["code"] == "malformed" and "surrogate" in r["error"]["message"]
        assert path.read_text() == original and agent.generation == 1
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("agent.toml")) \
            == ["agent.toml"]
