"""The fleet bench's deploy half at a small scale, on the real broker: gateways wired as the
bench wires them (dispatcher on the Uplink, real deploys and inference stage) take the cloud
side's signed deploy, and one that trusts another key refuses it by reason, so the bench's
success count and its failures by reason are real."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from agent.config.schema import MqttConfig
from agent.fleet.signing import SigningKey
from bench.fleet_deploy import FleetGateway, check_deployed, gateway_config, run_cloud
from tests.broker import Mosquitto
from tests.waiting import until


async def test_a_signed_deploy_reaches_the_gateways_that_trust_its_key(
        tmp_path: Path, broker: Mosquitto) -> None:
    ops, stranger = SigningKey.generate("ops-1"), SigningKey.generate("ops-2")
    ops.save(tmp_path / "ops.key")
    prefix = f"fb{uuid.uuid4().hex[:8]}"
    mqtt = MqttConfig(host=broker.host, port=broker.port, topic_prefix=prefix)
    ids = ["gw-a", "gw-b", "gw-odd"]
    fleet = [FleetGateway(gateway_config(
        gw, tmp_path / gw, mqtt.model_copy(update={"client_id": f"{prefix}-{gw}"}),
        *((stranger if gw == "gw-odd" else ops).key_id,
          (stranger if gw == "gw-odd" else ops).public))) for gw in ids]
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(t) for g in fleet for t in (g.outbox.run(), g.uplink.run())]
            await until(lambda: all(g.uplink.status()["state"] == "connected" for g in fleet),
                        30, "every gateway connected")
            out = await run_cloud(broker.host, broker.port, prefix, ids,
                                    str(tmp_path / "ops.key"))
            for t in tasks:
                t.cancel()
        # Where commands are signed, the odd gateway refuses even the signed ping.
        signed = out["signed_commands"]
        assert out["ping"]["ok"] == (2 if signed else 3)
        deploy = out["deploy"]
        assert deploy["ok"] == 2
        assert deploy["states"] == {"shadow": 2}
        assert list(deploy["failed"].values()) == [1]
        assert "unknown_key" in next(iter(deploy["failed"]))
        assert deploy["p50_s"] > 0 and deploy["p99_s"] >= deploy["p50_s"]
        say = check_deployed(fleet)
        assert say["in_shadow"] == 2
        assert list(say["wrong"]) == ["gw-odd"]
        # The command's envelope is refused first where it is checked, else the artifact.
        refused = say["refused_commands"] if signed else say["refused"]
        assert refused.get("unknown_key", 0) >= 1
        installed = sorted(p.relative_to(tmp_path).parts[0]
                           for p in tmp_path.glob("*/models/energy/*/energy.onnx"))
        assert installed == ["gw-a", "gw-b"]
    finally:
        for g in fleet:
            g.close()
