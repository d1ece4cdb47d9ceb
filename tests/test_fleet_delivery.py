"""Commands that survive the gateway being away, and a feed that survives losing a broker.

Against real mosquittos: the uplink's command session is persistent (MQTT 5 session expiry, or
clean session off on 3.1.1) under a stable client id, and ``[[mqtt.brokers]]`` lists a standby
the uplink fails over to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config.fleet import BrokerAddress
from agent.config.schema import MqttConfig, OutboxConfig
from agent.feed.messages import health_message
from agent.fleet.signing import SigningKey, TrustedKeys
from agent.fleet.tool import command
from agent.outbox.store import Outbox
from agent.uplink.commands import CommandDispatcher
from agent.uplink.forwarder import Uplink
from agent.uplink.seen import SeenCommands
from tests.broker import Mosquitto
from tests.test_uplink import broker_at, running
from tests.waiting import until

GW = "gw-fleet"


class Activations:
    def __init__(self) -> None:
        self.runs: list[str] = []

    async def __call__(self, args: dict[str, Any]) -> dict[str, Any]:
        self.runs.append(args["name"])
        return {"activated": args["name"]}


class Collector:
    """A cloud subscriber that keeps what it got when its broker dies under it."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.ready = asyncio.Event()

    def replies(self, req_id: str) -> list[dict[str, Any]]:
        return [b for t, b in self.got if t.endswith("/result") and b.get("id") == req_id]

    async def run(self, b: Mosquitto, topic: str, identifier: str) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(b.host, b.port, identifier=identifier) as c:
                await c.subscribe(topic, qos=1)
                self.ready.set()
                async for m in c.messages:
                    assert isinstance(m.payload, bytes)
                    self.got.append((str(m.topic), json.loads(m.payload)))


@contextlib.asynccontextmanager
async def collecting(b: Mosquitto, topic: str, identifier: str) -> AsyncIterator[Collector]:
    col = Collector()
    task = asyncio.create_task(col.run(b, topic, identifier), name=f"collect:{identifier}")
    try:
        await asyncio.wait_for(col.ready.wait(), 10)
        yield col
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(b: Mosquitto, topic: str, body: dict[str, Any], *,
                  retain: bool = False) -> None:
    async with aiomqtt.Client(b.host, b.port, identifier="fleet-cloud") as cloud:
        await cloud.publish(topic, json.dumps(body), qos=1, retain=retain)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_command_sent_while_the_gateway_is_down_runs_once_when_it_is_back(
        tmp_path: Path, protocol: str) -> None:
    key = SigningKey.generate("ops")
    activations = Activations()
    b = broker_at(tmp_path / "mosq")
    base = f"edge/{GW}/cmd"
    ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
    ob.open()
    cfg = MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5, protocol=protocol)  # type: ignore[arg-type]

    def uplink() -> tuple[Uplink, SeenCommands]:
        # A new process each time: a new dispatcher, the same table of ids on disk.
        seen = SeenCommands(tmp_path / "commands.db")
        seen.open()
        d = CommandDispatcher({"model.activate": activations}, seen=seen,
                              trusted=TrustedKeys({key.key_id: key.public}))
        return Uplink(cfg, GW, ob, d), seen

    async def session_up(up: Uplink, col: Collector, ping_id: str) -> None:
        """Connected and subscribed: a ping sent now is answered."""
        await until(lambda: up.status()["state"] == "connected", 10, "connected")
        await publish(b, f"{base}/ping", {"id": ping_id})
        await until(lambda: bool(col.replies(ping_id)), 10, f"reply to {ping_id}")

    try:
        async with collecting(b, f"{base}/+/result", "cloud-results") as col:
            up, seen = uplink()
            async with running(ob, up):
                await session_up(up, col, "p-1")
            seen.close()
            # The gateway is away: a signed command, and a retained one, wait at the broker.
            env = command("model.activate", {"name": "energy"}, gateway=GW, key=key)
            await publish(b, f"{base}/model.activate", env)
            stale = command("model.activate", {"name": "old"}, gateway=GW, key=key)
            await publish(b, f"{base}/model.activate", stale, retain=True)
            # Signed two hours ago for one hour: it waits at the broker, but only to be refused.
            late = command("model.activate", {"name": "late"}, gateway=GW, key=key,
                           now=datetime.now(UTC) - timedelta(hours=2))
            await publish(b, f"{base}/model.activate", late)
            assert col.replies(env["id"]) == []
            up, seen = uplink()
            async with running(ob, up):
                await until(lambda: all(col.replies(e["id"]) for e in (env, stale, late)), 15,
                            "the queued commands")
                await session_up(up, col, "p-2")
                assert up.connector.session_present is True
                back = up.status()["commands"]
            seen.close()
            # And again: nothing is delivered, or run, twice.
            up, seen = uplink()
            async with running(ob, up):
                await session_up(up, col, "p-3")
                st = up.status()["commands"]
            seen.close()
    finally:
        ob.close()
        b.stop()
    (reply,) = col.replies(env["id"])
    assert reply["ok"] is True and reply["result"] == {"activated": "energy"}
    (expired,) = col.replies(late["id"])
    assert expired["error"]["code"] == "expired" and back["refused"]["expired"] == 1
    retained = col.replies(stale["id"])
    assert retained and retained[-1]["error"]["code"] == "retained"
    assert st["refused"].get("retained", 0) >= 1
    if protocol == "5":
        # Subscribed with "retain as published": the retained copy queued for the session is
        # seen as retained too, and refused.
        assert activations.runs == ["energy"]
        assert all(r["error"]["code"] == "retained" for r in retained)
    else:
        # A 3.1.1 broker clears the flag on what it queued for a live session: that copy cannot
        # be told apart, and runs -- once (the id is spent), never after it expired.
        assert sorted(activations.runs) == ["energy", "old"]


async def test_a_clean_session_loses_what_was_sent_while_away(tmp_path: Path) -> None:
    """The control case: with session_expiry_s = 0 the broker forgets the subscription."""
    b = broker_at(tmp_path / "mosq")
    base = f"edge/{GW}/cmd"
    ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
    ob.open()
    cfg = MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5, session_expiry_s=0)
    try:
        async with collecting(b, f"{base}/+/result", "cloud-results") as col:
            up = Uplink(cfg, GW, ob, CommandDispatcher())
            async with running(ob, up):
                await until(lambda: up.status()["state"] == "connected", 10)
            await publish(b, f"{base}/ping", {"id": "away"})
            up = Uplink(cfg, GW, ob, CommandDispatcher())
            async with running(ob, up):
                await until(lambda: up.status()["state"] == "connected", 10)
                await publish(b, f"{base}/ping", {"id": "back"})
                await until(lambda: bool(col.replies("back")), 10)
    finally:
        ob.close()
        b.stop()
    assert col.replies("away") == []


async def test_the_feed_fails_over_to_the_next_broker_without_a_gap(tmp_path: Path) -> None:
    first = broker_at(tmp_path / "m1")
    second = broker_at(tmp_path / "m2")
    ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
    ob.open()
    cfg = MqttConfig(host=first.host, port=first.port, reconnect_max_s=0.5,
                     brokers=[BrokerAddress(host=second.host, port=second.port)])
    up = Uplink(cfg, GW, ob)
    topic = f"edge/{GW}/health"
    seqs: list[int] = []
    try:
        async with collecting(first, topic, "cloud-1") as c1, \
                collecting(second, topic, "cloud-2") as c2, running(ob, up):
            await until(lambda: up.status()["state"] == "connected", 10, "connected")
            assert up.status()["broker"] == f"{first.host}:{first.port}"
            for i in range(40):
                seqs.append(ob.put("health", "health", health_message(GW, {"i": i})))
                await asyncio.sleep(0.01)
            await until(lambda: up.status()["acked"] >= 20, 10, "first half acknowledged")
            first.stop(signal.SIGKILL)
            for i in range(40, 80):
                seqs.append(ob.put("health", "health", health_message(GW, {"i": i})))
                await asyncio.sleep(0.01)
            await until(lambda: ob.unsent_rows == 0 and ob.pending_rows == 0, 20,
                        "everything acknowledged")
            st = up.status()
    finally:
        ob.close()
        first.stop()
        second.stop()
    assert st["broker"] == f"{second.host}:{second.port}"
    got = {b["seq"] for _t, b in c1.got + c2.got}
    assert set(seqs) <= got, sorted(set(seqs) - got)
    assert c2.got, "nothing came through the second broker"


async def test_the_cloud_reads_the_feed_with_shared_subscriptions(tmp_path: Path) -> None:
    """docs/fleet.md: several cloud consumers share one feed, each message to exactly one."""
    b = broker_at(tmp_path / "mosq")
    ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
    ob.open()
    up = Uplink(MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5), GW, ob)
    shared = "$share/cloud/edge/+/health"
    try:
        async with collecting(b, shared, "consumer-1") as c1, \
                collecting(b, shared, "consumer-2") as c2, running(ob, up):
            await until(lambda: up.status()["state"] == "connected", 10, "connected")
            seqs = [ob.put("health", "health", health_message(GW, {"i": i})) for i in range(60)]
            await until(lambda: len(c1.got) + len(c2.got) >= len(seqs), 10, "every message")
    finally:
        ob.close()
        b.stop()
    one = [m["seq"] for _t, m in c1.got]
    two = [m["seq"] for _t, m in c2.got]
    assert sorted(one + two) == seqs  # each message to one consumer, none lost
    assert one and two  # and the load is spread


async def test_many_commands_waiting_at_the_broker_are_all_answered(tmp_path: Path) -> None:
    """More than the uplink's inbox holds: the broker's receive maximum keeps the rest."""
    b = broker_at(tmp_path / "mosq")
    base = f"edge/{GW}/cmd"
    ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
    ob.open()
    cfg = MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5, protocol="5")
    count = 400  # the inbox keeps 256
    try:
        async with collecting(b, f"{base}/+/result", "cloud-results") as col:
            up = Uplink(cfg, GW, ob, CommandDispatcher())
            async with running(ob, up):
                await until(lambda: up.status()["state"] == "connected", 10)
            async with aiomqtt.Client(b.host, b.port, identifier="fleet-cloud") as cloud:
                for i in range(count):
                    await cloud.publish(f"{base}/ping", json.dumps({"id": f"q-{i}"}), qos=1)
            up = Uplink(cfg, GW, ob, CommandDispatcher())
            async with running(ob, up):
                await until(lambda: len(col.got) >= count, 30, "every reply")
    finally:
        ob.close()
        b.stop()
    assert sorted(b["id"] for _t, b in col.got) == sorted(f"q-{i}" for i in range(count))


async def test_a_command_cut_short_by_a_stop_is_not_run_again(tmp_path: Path) -> None:
    """Acknowledged to the broker only after its reply: the broker delivers it again after
    the restart, and the table of ids answers instead of running it twice."""
    key = SigningKey.generate("ops")
    b = broker_at(tmp_path / "mosq")
    base = f"edge/{GW}/cmd"
    ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
    ob.open()
    cfg = MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5)
    started: list[str] = []

    async def stuck(args: dict[str, Any]) -> dict[str, Any]:
        started.append(args["name"])
        await asyncio.Event().wait()  # until the agent stops under it
        return {}

    def uplink() -> tuple[Uplink, SeenCommands]:
        seen = SeenCommands(tmp_path / "commands.db")
        seen.open()
        d = CommandDispatcher({"model.activate": stuck}, seen=seen,
                              trusted=TrustedKeys({key.key_id: key.public}))
        return Uplink(cfg, GW, ob, d), seen

    env = command("model.activate", {"name": "energy"}, gateway=GW, key=key)
    try:
        async with collecting(b, f"{base}/+/result", "cloud-results") as col:
            up, seen = uplink()
            async with running(ob, up):
                await until(lambda: up.status()["state"] == "connected", 10)
                await publish(b, f"{base}/model.activate", env)
                await until(lambda: started == ["energy"], 10, "the handler running")
            seen.close()
            up, seen = uplink()
            async with running(ob, up):
                await until(lambda: bool(col.replies(env["id"])), 15, "the redelivery")
            seen.close()
    finally:
        ob.close()
        b.stop()
    (reply,) = col.replies(env["id"])
    assert reply["error"]["code"] == "duplicate" and "cut short" in reply["error"]["message"]
    assert started == ["energy"]
