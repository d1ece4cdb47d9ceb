"""model.deploy in the running agent over a real mosquitto.

- A signed deploy interrupted midway (the broker is killed after a few chunks, and the agent
  restarted while it is down) resumes: the second call sends only the missing chunks.
- The skill gate on live windows: the agent's clock is stepped through a load that rises on a
  ramp, one meter reading stream, where the shipped energy model runs. A perturbed copy of the
  shipped model (its forecast moved by 250 W) stays in shadow; a "next = current + 20 W" graph
  (tests/test_shadow.py), exact on this ramp, is activated by the agent itself. The activation
  survives a reload and a restart, and ``model.rollback`` (also kept across a restart) returns
  to the shipped model.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import aiomqtt
import onnx
import pytest
from onnx import TensorProto, helper

from agent.fleet.deploy_client import (
    DeployInterrupted,
    DeployResult,
    MqttCommander,
    deploy_model,
    plain_envelope,
    signed_envelope,
)
from agent.fleet.signing import SigningKey
from agent.readings import Reading
from agent.runtime import Agent
from agent.uplink.commands import CommandDispatcher
from models.manifest import sha256_bytes, shipped_paths
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until, write_toml
from tests.test_fleet_model import KEY
from tests.test_guard_agent import SteppedClock
from tests.test_shadow import SLOPE_W, T0, offset_model

S = 10**9
GW = "gw-test"
# State-changing commands run only signed while require_signature is on, and only where the
# dispatcher verifies command signatures; where it cannot yet, they run with it off (the
# artifact's own signature is checked either way when present).
SIGNED_COMMANDS = bool(getattr(CommandDispatcher, "verifies_signatures", False))
ENVELOPE = signed_envelope(KEY) if SIGNED_COMMANDS else plain_envelope


def agent_config(tmp: Path, port: int, key: SigningKey, active: Path | str) -> dict[str, Any]:
    return make_config(
        tmp, port,
        sensors=[{"name": "meter", "driver": "synthetic", "enabled": False}],
        streams=[{"name": "cabinet", "sensors": ["meter"], "window_s": 60}],
        models=[{"name": "energy", "stream": "cabinet", "path": str(active),
                 "activate_min_s": 3600}],
        commands={"require_signature": SIGNED_COMMANDS,
                  "trusted_keys": [{"id": key.key_id, "public_key": key.public}]},
        runtime={"stop_timeout_s": 1.0},
        mqtt={"reconnect_max_s": 0.5})


async def connected(agent: Agent) -> None:
    def up() -> bool:
        p = agent.pipeline
        return p is not None and p.uplink.status()["state"] == "connected"

    await until(up, 20, "the agent connected")


def perturbed_shipped(tmp: Path, offset_w: float) -> Path:
    """The shipped energy model with ``offset_w`` added to its forecast, and its manifest."""
    src, man = shipped_paths("energy")
    model = onnx.load(str(src))
    last = model.graph.node[-1]
    assert list(last.output) == ["power_next_w"]
    last.output[0] = "unperturbed"
    model.graph.initializer.append(helper.make_tensor("perturbation", TensorProto.FLOAT, [1],
                                                      [offset_w]))
    model.graph.node.append(helper.make_node("Add", ["unperturbed", "perturbation"],
                                             ["power_next_w"]))
    onnx.checker.check_model(model)
    dst = tmp / "energy-perturbed.onnx"
    dst.write_bytes(model.SerializeToString())
    doc = json.loads(man.read_text())
    digest = sha256_bytes(dst.read_bytes())
    doc.update(sha256=digest, version=digest[:12], file=dst.name)
    dst.with_suffix(".json").write_text(json.dumps(doc))
    return dst


async def command(port: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", port, identifier="cloud-command") as client, \
            MqttCommander(client, "t", ENVELOPE) as commander:
        return await commander.request(GW, name, args, 10.0)


async def rollback(port: int, name: str) -> dict[str, Any]:
    return await command(port, "model.rollback", {"name": name})


async def deploy(port: int, model: Path, key: SigningKey | None,
                 **kwargs: Any) -> DeployResult:
    """``deploy_model`` over a fresh cloud-side connection."""
    client = aiomqtt.Client("127.0.0.1", port, identifier=f"cloud-{model.stem}", timeout=1)
    await client.__aenter__()
    try:
        async with MqttCommander(client, "t", ENVELOPE) as commander:
            return await deploy_model(commander, GW, model, model.with_suffix(".json"), key,
                                      timeout_s=5.0, **kwargs)
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return KEY


@pytest.mark.parametrize("restart_agent", [False, True], ids=["broker", "broker+agent"])
async def test_a_deploy_interrupted_by_a_broker_restart_resumes_and_completes(
        tmp_path: Path, private_broker: Mosquitto, key: SigningKey,
        restart_agent: bool) -> None:
    active = offset_model(tmp_path, 100.0, "active")
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    config = agent_config(tmp_path, private_broker.port, key, active)
    acked: list[int] = []

    def cut(done: int, _count: int) -> None:
        acked.append(done)
        if done == 5:
            private_broker.stop(signal.SIGKILL)  # mid-deploy, nothing flushed

    async with contextlib.AsyncExitStack() as stack:
        agent = await stack.enter_async_context(running_agent(config))
        await connected(agent)
        with pytest.raises(DeployInterrupted):
            await deploy(private_broker.port, cand, key, chunk_size=256, in_flight=1,
                         progress=cut)
        assert acked == [1, 2, 3, 4, 5]
        if restart_agent:  # stopped while the broker is down; both come back
            await stack.aclose()
        private_broker.start()
        if restart_agent:
            agent = await stack.enter_async_context(running_agent(config))
        await connected(agent)
        refused = await deploy(private_broker.port, cand, SigningKey.generate("intruder"),
                               chunk_size=256)
        assert not refused.ok and refused.error is not None
        assert "unknown_key" in refused.error, refused.error
        result = await deploy(private_broker.port, cand, key, chunk_size=256)
        assert result.ok, result.error
        assert result.chunks > 10 and result.sent == result.chunks - 5
        assert result.state == "shadow"
        p = agent.pipeline
        assert p is not None and agent.infer is not None
        info = agent.infer.candidate("energy")
        installed = tmp_path / "models" / "energy" / result.version / "energy.onnx"
        assert info is not None and info[0] == installed
        assert installed.read_bytes() == cand.read_bytes()
        health = p.snapshot()["models"]["deployments"]
        assert health["installed"] == 1 and health["refused"] == {"unknown_key": 1}
        assert health["in_progress"] == {}


class Site:
    """Readings of one meter on a ramp, played into the agent on a stepped clock."""

    def __init__(self) -> None:
        self.clock = SteppedClock(T0 * S)
        self.k = 0

    async def play(self, agent: Agent, windows: int) -> None:
        p = agent.pipeline
        assert p is not None
        offset = self.clock.mono_ns() - self.clock.wall_ns()
        for _ in range(windows):
            start = (T0 + 60 * self.k) * S
            power = 1000.0 + SLOPE_W * (60 * self.k) / 300
            self.clock.now = start + S // 2
            for j in (10, 30, 50):
                t = start + j * S
                assert p.readings.put(Reading("meter", "active_power", power, "W", t,
                                              t + offset))
            await until(lambda: len(p.readings) == 0, 10, f"window {self.k} taken")
            self.k += 1


async def test_a_worse_candidate_stays_in_shadow_a_better_one_is_activated_and_stays(
        tmp_path: Path, broker: Mosquitto, key: SigningKey) -> None:
    worse = perturbed_shipped(tmp_path, 250.0)
    better = offset_model(tmp_path, SLOPE_W, "better")  # exact on this site's ramp
    config = agent_config(tmp_path, broker.port, key, "")  # the shipped model
    path = write_toml(tmp_path / "agent.toml", config)
    site = Site()
    async with running_agent(config, config_path=path, clock=site.clock) as agent:
        assert agent.infer is not None
        first = agent.infer.versions()["energy"]
        await connected(agent)
        result = await deploy(broker.port, worse, key)
        assert result.ok and result.state == "shadow", result.error
        await site.play(agent, 180)
        await until(lambda: (c := agent.infer.candidate("energy")) is not None  # type: ignore[union-attr]
                    and c[1] is not None and c[1].evaluated_s >= 3600, 10,
                    "an hour of scored live windows")
        info = agent.infer.candidate("energy")
        assert info is not None and info[1] is not None and "does not beat" in info[1].reason
        assert info[1].candidate_mae is not None and info[1].active_mae is not None
        assert info[1].candidate_mae > info[1].active_mae
        assert agent.infer.versions()["energy"] == first

        result = await deploy(broker.port, better, key)
        assert result.ok and result.state == "shadow", result.error
        await site.play(agent, 180)
        await until(lambda: agent.infer.versions()["energy"] == result.version, 10,  # type: ignore[union-attr]
                    "the better candidate activated by the gate")
        assert agent.infer.candidate("energy") is None
        p = agent.pipeline
        assert p is not None and p.snapshot()["models"]["deployments"]["activated"] == 1
        agent.request_reload()  # a new generation reads the activation back
        await until(lambda: agent.generation == 2, 20, "the reload")
        assert agent.infer.versions()["energy"] == result.version
        assert agent.infer.candidate("energy") is None

    site = Site()
    async with running_agent(config, clock=site.clock) as agent:
        assert agent.infer is not None
        assert agent.infer.versions()["energy"] == result.version
        assert agent.infer.candidate("energy") is None
        await connected(agent)
        reply = await rollback(broker.port, "energy")
        assert reply["ok"] and reply["result"]["to"] == "shipped", reply
        assert agent.infer.versions()["energy"] == first
    async with running_agent(config, clock=Site().clock) as agent:
        assert agent.infer is not None
        assert agent.infer.versions()["energy"] == first
        await connected(agent)
        reply = await rollback(broker.port, "energy")
        assert not reply["ok"] and "no previous version" in reply["error"]["message"]


async def test_model_activate_is_remembered_across_a_restart(tmp_path: Path, broker: Mosquitto,
                                                             key: SigningKey) -> None:
    active = offset_model(tmp_path, 100.0, "active")
    shadow = offset_model(tmp_path, SLOPE_W, "shadow")
    config = agent_config(tmp_path, broker.port, key, active)
    config["models"][0]["shadow"] = str(shadow)
    async with running_agent(config) as agent:
        assert agent.infer is not None
        await connected(agent)
        refused = await command(broker.port, "model.activate", {"name": "energy"})
        assert not refused["ok"] and "needed" in refused["error"]["message"]  # not scored yet
        forced = await command(broker.port, "model.activate", {"name": "energy", "force": True})
        assert forced["ok"], forced
        version = agent.infer.versions()["energy"]
        assert agent.infer.candidate("energy") is None
    async with running_agent(config) as agent:
        assert agent.infer is not None
        assert agent.infer.versions()["energy"] == version
        assert agent.infer.candidate("energy") is None  # the shadow it was is the active now


async def test_hostile_replies_on_the_result_topics_do_not_stop_the_commander(
        tmp_path: Path, broker: Mosquitto) -> None:
    # The commander signs its requests, and a signature shown is checked: trust its key.
    config = make_config(tmp_path, broker.port, commands={"trusted_keys": [
        {"id": KEY.key_id, "public_key": KEY.public}]})
    async with running_agent(config) as agent:
        await connected(agent)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-h") as client, \
                MqttCommander(client, "t", ENVELOPE) as commander, \
                aiomqtt.Client("127.0.0.1", broker.port, identifier="intruder") as intruder:
            topic = f"t/{GW}/cmd/ping/result"
            for junk in (b"[" * 100_000, b"\xff\xfe{", b"1e999999", b'{"id": 5}', b"[]",
                         b'{"gateway": "gw-test", "name": "ping", "id": {"x": 1}}'):
                await intruder.publish(topic, junk, qos=1)
            reply = await commander.request(GW, "ping", {}, 10.0)
            assert reply["ok"] and reply["result"]["pong"] is True


async def test_model_commands_never_run_unsigned_while_signatures_are_required(
        tmp_path: Path, broker: Mosquitto) -> None:
    config = agent_config(tmp_path, broker.port, KEY, offset_model(tmp_path, 1.0, "a"))
    config["commands"]["require_signature"] = True
    async with running_agent(config) as agent:
        await connected(agent)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-u") as client, \
                MqttCommander(client, "t", plain_envelope) as commander:
            for name, args in (("model.deploy", {"op": "status", "deploy_id": "d"}),
                               ("model.rollback", {"name": "energy"})):
                reply = await commander.request(GW, name, args, 10.0)
                # Refused for want of a signature, or not offered at all where this agent
                # cannot verify command signatures.
                expected = "unsigned" if SIGNED_COMMANDS else "unavailable"
                assert not reply["ok"] and reply["error"]["code"] == expected, reply
