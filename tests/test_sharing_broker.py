"""The sharing policy and the broker recipe of docs/sharing.md on a real mosquitto.

The broker runs with a password file made by ``mosquitto_passwd`` and the ACL file shipped in
``docs/mosquitto-acl.example``. Messages go the way the pipeline sends them: real windows from
the windower, feed drafts, the sharing policy, the SQLite outbox, and the uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.cli.sharing import describe
from agent.config.load import parse_config
from agent.config.schema import AgentConfig, MqttConfig, OutboxConfig
from agent.feed.messages import health_message, inference_message, reading_message, window_message
from agent.feed.sharing import SharingPolicy
from agent.outbox.store import Outbox
from agent.pipeline.windows import Windower
from agent.readings import Inference, Reading
from agent.uplink.forwarder import Uplink
from tests.broker import Mosquitto, free_port
from tests.harness import make_config, running_agent, until

ROOT = Path(__file__).resolve().parents[1]
ACL = ROOT / "docs" / "mosquitto-acl.example"
USERS = {"gw-a": "pw-a", "gw-b": "pw-b", "cloud-public": "pw-public", "cloud-ops": "pw-ops"}
PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
T0 = 1_700_000_000 * 10**9
S = 10**9
KMH = 0.2778

pytestmark = pytest.mark.skipif(not Path(PASSWD).exists(),
                                reason="mosquitto_passwd is not installed (package mosquitto)")


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    work = tmp_path_factory.mktemp("acl-broker")
    passwd = work / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run([PASSWD, "-b", *create, str(passwd), user, password], check=True,
                       capture_output=True, timeout=30)
    port = free_port()
    # mosquitto's default queue bound, as on a production broker: with `max_queued_messages 0`
    # mosquitto 2.0 drops the connection after every refusing PUBACK.
    broker = Mosquitto(work, port=port, listeners=(
        f"listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {passwd}\nacl_file {ACL}\n"), extra_conf="max_queued_messages 1000\n")
    broker.start()
    yield broker
    broker.stop()


def credentials(tmp_path: Path, user: str) -> str:
    path = tmp_path / f"{user}.cred"
    path.write_text(f"{user}\n{USERS[user]}\n")
    path.chmod(0o600)
    return str(path)


class Consumer:
    """A cloud consumer: records (topic, body) of everything the broker lets it read."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []

    def topics(self) -> set[str]:
        return {t for t, _ in self.got}

    def bodies(self, topic: str) -> list[Any]:
        return [b for t, b in self.got if t == topic]


@contextlib.asynccontextmanager
async def consumer(broker: Mosquitto, user: str, *filters: str) -> AsyncIterator[Consumer]:
    c = Consumer()
    async with aiomqtt.Client(broker.host, broker.port, username=user, password=USERS[user],
                              identifier=f"{user}-reader",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        for f in filters:
            await client.subscribe(f, qos=1, timeout=10)

        async def pump() -> None:
            async for m in client.messages:
                raw = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                c.got.append((str(m.topic), body))

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(pump(), name=f"consumer:{user}")
            yield c
            task.cancel()


async def probe(broker: Mosquitto, user: str, topic: str) -> None:
    """Publish a marker as ``user``: once a consumer has it, everything the broker routed
    before it has been delivered to that consumer too (mosquitto keeps per-client order)."""
    async with aiomqtt.Client(broker.host, broker.port, username=user, password=USERS[user],
                              identifier=f"{user}-probe",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.publish(topic, b'"probe"', qos=1, timeout=10)


@contextlib.asynccontextmanager
async def uplink(tmp_path: Path, broker: Mosquitto, gateway: str, user: str,
                 protocol: str = "5") -> AsyncIterator[tuple[Outbox, Uplink]]:
    mq = MqttConfig(host=broker.host, port=broker.port, topic_prefix="edge",
                    credentials_file=credentials(tmp_path, user), protocol=protocol,  # type: ignore[arg-type]
                    reconnect_max_s=0.5, poison_attempts=2)
    ob = Outbox(OutboxConfig(path=str(tmp_path / f"{gateway}-{user}.db"),
                             commit_interval_ms=20), gateway)
    ob.open()
    up = Uplink(mq, gateway, ob)
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(ob.run(), name="outbox"),
                     tg.create_task(up.run(), name="uplink")]
            await until(lambda: up.status()["state"] == "connected", 10, "uplink connected")
            yield ob, up
            for t in tasks:
                t.cancel()
    finally:
        ob.close()


SENSORS = [
    {"name": "radar", "driver": "synthetic", "period_s": 0.05,
     "options": {"quantity": "speed_in", "unit": "m/s", "base": 12.0, "amplitude": 2.0,
                 "cycle_s": 3.0}},
    {"name": "env", "driver": "synthetic", "period_s": 0.1},
    {"name": "meter", "driver": "synthetic", "options": {"quantity": "active_power",
                                                         "unit": "W", "base": 500.0}},
]
STREAMS = [
    {"name": "traffic", "sensors": ["radar"], "round": {"*.speed_*": KMH},
     "audiences": [{"name": "public", "share": "window", "min_vehicles": 5},
                   {"name": "ops", "share": "raw", "drop": [], "round": {}, "min_vehicles": 0,
                    "vehicle_events": True}]},
    {"name": "environment", "sensors": ["env"], "share": "local"},
    {"name": "energy", "sensors": ["meter"], "share": "derived"},
]


def city_config(gateway: str) -> AgentConfig:
    return parse_config({"gateway": {"id": gateway}, "sensors": SENSORS, "streams": STREAMS,
                         "models": [{"name": "traffic", "stream": "traffic"},
                                    {"name": "energy", "stream": "energy"}],
                         "mqtt": {"topic_prefix": "edge"}})


def produce(cfg: AgentConfig, policy: SharingPolicy, ob: Outbox) -> int:
    """What the pipeline does with two windows of readings; returns the messages put."""
    gw = cfg.gateway.id
    windower = Windower(cfg.streams, cfg.sensors)
    put = 0

    def send(kind: str, stream: str, draft: Any) -> None:
        nonlocal put
        for topic, routed in policy.route(kind, stream, draft):
            ob.put(kind, topic, routed)  # type: ignore[arg-type]
            put += 1

    speeds = [[13.1, 14.2, 12.9, 15.5, 11.8, 13.6], [12.2, 16.1]]  # 6 vehicles, then 2
    for i, window_speeds in enumerate(speeds):
        start = T0 + i * 10 * S
        readings = [Reading("radar", "speed_in", v, "m/s", start + (j + 1) * S // 2, j)
                    for j, v in enumerate(window_speeds)]
        readings += [Reading("env", "temperature", 21.0 + j, "degC", start + j * S, j)
                     for j in range(3)]
        readings += [Reading("meter", "active_power", 480.0 + j, "W", start + j * S, j)
                     for j in range(3)]
        for r in readings:
            windower.add(r)
            for stream in windower.raw_streams_for(r.sensor):
                send("raw", stream, reading_message(gw, stream, r))
    for w in windower.flush():
        send("window", w.stream, window_message(gw, w))
        for m in cfg.models:
            if m.stream == w.stream:
                outputs = ({"speed_next": 12.3456, "congestion_level": "free"}
                           if m.name == "traffic" else {"power_next_w": 491.234})
                send("inference", w.stream, inference_message(
                    gw, Inference(m.name, "v1", w.start_ns, outputs, 1.0, stream=w.stream)))
    send("health", "", health_message(gw, {"sensors": [
        {"name": "env", "last_values": {"temperature": {"value": 23.0, "unit": "degC"}}},
        {"name": "radar", "last_values": {"speed_in": {"value": 16.1, "unit": "m/s"}}}]}))
    return put


def listed_topics(plan: dict[str, Any], audience: str | None = None) -> set[str]:
    out: set[str] = set()
    for st in plan["streams"]:
        for ns in st["namespaces"]:
            if audience is not None and ns["audience"] != audience:
                continue
            t = ns["topics"]
            out |= {x for x in (t["raw"], t["window"]) if x} | set(t["inference"].values())
    return out


def paths(window: dict[str, Any]) -> dict[str, Any]:
    """Field path -> value of a window body, named as drop and round patterns name them."""
    out: dict[str, Any] = {}
    for root in ("channels", "fused"):
        for name, st in window[root].items():
            for stat in ("mean", "min", "max", "last", "std"):
                out[f"{root}.{name}.{stat}"] = st[stat]
    out.update({f"derived.{k}": v for k, v in window["derived"].items()})
    return out


async def test_show_matches_what_each_consumer_receives(tmp_path: Path,
                                                        acl_broker: Mosquitto) -> None:
    cfg = city_config("gw-a")
    plan = describe(cfg)
    policy = SharingPolicy(cfg)
    async with consumer(acl_broker, "cloud-ops", "edge/#") as ops, \
            consumer(acl_broker, "cloud-public", "edge/#", "edge/+/ops/#") as public, \
            uplink(tmp_path, acl_broker, "gw-a", "gw-a") as (ob, up):
        put = produce(cfg, policy, ob)
        await until(lambda: up.counts["acked"] >= put, 10, "every message acknowledged")
        await probe(acl_broker, "gw-a", "edge/gw-a/public/probe")
        await until(lambda: "edge/gw-a/public/probe" in public.topics()
                    and "edge/gw-a/public/probe" in ops.topics(), 10, "the probe")
    assert up.counts["refused"] == 0 and up.counts["quarantined"] == 0
    feed = {"edge/gw-a/status", "edge/gw-a/health", "edge/gw-a/public/probe"}

    # Operations reads every namespace: exactly the topics `sharing show` lists.
    assert ops.topics() - feed == listed_topics(plan)
    assert not any("environment" in t for t in ops.topics())  # the local stream
    assert not any(isinstance(b, dict) and b.get("stream") == "environment" for _, b in ops.got)
    # The open-data consumer gets its audience and nothing else, though it asked for more.
    assert public.topics() - feed == listed_topics(plan, "public") == {
        "edge/gw-a/public/telemetry/traffic", "edge/gw-a/public/inference/traffic"}

    traffic = plan["streams"][0]
    pub_ns, ops_ns = traffic["namespaces"]
    # k = 5: of the windows with 6 and 2 vehicles, the public gets the first only.
    windows = public.bodies("edge/gw-a/public/telemetry/traffic")
    assert [w["derived"]["vehicles"] for w in windows] == [6.0]
    assert all(w["derived"]["vehicles"] >= pub_ns["min_vehicles"] for w in windows)
    assert len(ops.bodies("edge/gw-a/ops/telemetry/traffic")) == 2
    # What `show` lists as withheld is null; what it lists as rounded is on the step.
    (w,) = windows
    fields = paths(w)
    dropped = [p for p in fields if any(fnmatch.fnmatchcase(p, pat) for pat in pub_ns["drop"])]
    assert dropped and all(fields[p] is None for p in dropped)
    assert "redacted" in w["flags"]
    ((pattern, step),) = pub_ns["round"].items()
    rounded = [v for p, v in fields.items() if fnmatch.fnmatchcase(p, pattern) and v is not None]
    assert rounded and all(abs(v / step - round(v / step)) < 1e-6 for v in rounded)
    # The forecast made at the 2-vehicle window is withheld with that window: only the
    # first window's inference reaches the public, rounded like the speeds it stands for.
    (inf,) = public.bodies("edge/gw-a/public/inference/traffic")
    assert inf["window_start"] == w["start"]
    assert inf["outputs"]["speed_next"] == pytest.approx(44 * KMH)
    assert len(ops.bodies("edge/gw-a/ops/inference/traffic")) == 2
    # Operations: full detail, per-vehicle readings (vehicle_events), no rounding.
    assert ops_ns["vehicle_events"] and not ops_ns["round"] and not ops_ns["drop"]
    raw = ops.bodies("edge/gw-a/ops/raw/traffic")
    assert sorted(r["value"] for r in raw) == sorted([13.1, 14.2, 12.9, 15.5, 11.8, 13.6,
                                                      12.2, 16.1])
    first = ops.bodies("edge/gw-a/ops/telemetry/traffic")[0]["channels"]["radar.speed_in"]
    assert first["max"] == 15.5 and first["min"] == 11.8
    # The derived stream: inferences only, on the plain topics.
    assert [b["outputs"] for b in ops.bodies("edge/gw-a/inference/energy")] == [
        {"power_next_w": 491.234}] * 2
    # Health: the local stream's last value stays on the gateway.
    (health,) = ops.bodies("edge/gw-a/health")
    values = {s["name"]: s["last_values"] for s in health["health"]["sensors"]}
    assert "value" not in values["env"]["temperature"]
    assert values["radar"]["speed_in"]["value"] == 16.1  # ops publishes it as it is
    counts = policy.stats()
    assert counts["traffic"]["suppressed"] == 2  # the window and the forecast made at it
    assert counts["environment"]["local"] == 2 and counts["environment"]["published"] == 0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_gateway_cannot_write_into_another_gateways_namespace(
        tmp_path: Path, acl_broker: Mosquitto, protocol: str) -> None:
    """Authenticated as gw-a but configured as gw-b: every publish is refused or dropped."""
    cfg = city_config("gw-b")
    policy = SharingPolicy(cfg)
    async with consumer(acl_broker, "cloud-ops", "edge/gw-b/#") as ops, \
            uplink(tmp_path, acl_broker, "gw-b", "gw-a", protocol) as (ob, up):
        put = produce(cfg, policy, ob)
        if protocol == "5":
            # PUBACK 0x87: counted, retried poison_attempts (2) times, then quarantined.
            await until(lambda: up.counts["quarantined"] == put, 15, "all quarantined")
            assert up.counts["refused"] == 2 * put
            assert up.counts["published"] == 2 * put  # no loop: two attempts each, no more
            assert up.counts["acked"] == 0
        else:
            # MQTT 3.1.1 has no negative PUBACK: mosquitto acknowledges and drops.
            await until(lambda: up.counts["acked"] == put, 10, "all acknowledged")
            assert up.counts["refused"] == 0
        await until(lambda: ob.stats()["rows"] == 0, 10, "outbox empty")
        assert up.status()["state"] == "connected"  # the broker kept the connection
        await probe(acl_broker, "gw-b", "edge/gw-b/probe")
        await until(lambda: "edge/gw-b/probe" in ops.topics(), 10, "the probe")
    assert ops.topics() == {"edge/gw-b/probe"}  # nothing of the impostor's, not even status
    if protocol == "5":
        assert ob.stats()["quarantined"] == put


async def test_running_agent_publishes_only_what_its_policy_allows(
        tmp_path: Path, acl_broker: Mosquitto) -> None:
    data = make_config(tmp_path, acl_broker.port, sensors=SENSORS[:2], streams=[
        {**STREAMS[0], "window_s": 1.0}, STREAMS[1]],
        mqtt={"topic_prefix": "edge", "credentials_file": credentials(tmp_path, "gw-a")})
    data["gateway"]["id"] = "gw-a"
    async with consumer(acl_broker, "cloud-ops", "edge/gw-a/#") as ops, running_agent(data):
        await until(lambda: {"edge/gw-a/public/telemetry/traffic",
                             "edge/gw-a/ops/raw/traffic"} <= ops.topics(), 15,
                    "public windows and ops readings")
    assert not any("environment" in t or "/public/raw/" in t for t in ops.topics())
    for w in ops.bodies("edge/gw-a/public/telemetry/traffic"):
        assert w["channels"]["radar.speed_in"]["max"] is None
