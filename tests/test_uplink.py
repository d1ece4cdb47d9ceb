"""The uplink against a real mosquitto: delivery, replay lanes, status, poison messages, auth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config.schema import MqttConfig, OutboxConfig
from agent.feed.messages import health_message, window_message
from agent.outbox.store import Outbox
from agent.readings import ChannelStats, Window
from agent.uplink.forwarder import Uplink
from tests.broker import Mosquitto, free_port
from tests.waiting import until as wait_until

GW = "gw-up"


def broker_at(path: Path, extra: str = "", listeners: str | None = None,
              port: int | None = None) -> Mosquitto:
    b = Mosquitto(path, port=port, extra_conf=extra, listeners=listeners)
    try:
        b.start()
    except BaseException:
        b.stop()  # a broker that started but never listened must not outlive the test
        raise
    return b


@pytest.fixture
def mosq(tmp_path: Path) -> Any:
    b = broker_at(tmp_path / "mosq")
    yield b
    b.stop()


def window(i: int, stream: str = "climate") -> Window:
    s = ChannelStats(3, 20.0 + i, 19.0, 21.0, 20.5, 0.2, "degC")
    return Window(stream, i * 10**10, (i + 1) * 10**10, {"bme.temperature": s})



class Sub:
    """A subscriber that records every message (topic, decoded JSON or text, retain flag)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any, bool]] = []

    def feed(self, prefix: str = "") -> list[dict[str, Any]]:
        return [b for t, b, _ in self.got if isinstance(b, dict) and t.startswith(prefix)]

    def seqs(self, prefix: str = "") -> list[int]:
        return [b["seq"] for b in self.feed(prefix) if "seq" in b]


@contextlib.asynccontextmanager
async def subscribed(host: str, port: int, topic: str = "edge/#", **kw: Any) -> AsyncIterator[Sub]:
    sub = Sub()
    async with aiomqtt.Client(host, port, identifier=f"sub-{time.monotonic_ns()}", **kw) as c:
        await c.subscribe(topic, qos=1)

        async def pump() -> None:
            async for m in c.messages:
                raw = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                sub.got.append((str(m.topic), body, bool(m.retain)))

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(pump(), name="subscriber")
            yield sub
            task.cancel()


@contextlib.asynccontextmanager
async def running(ob: Outbox, up: Uplink) -> AsyncIterator[None]:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(ob.run(), name="outbox"), tg.create_task(up.run(), name="uplink")]
        yield
        for t in tasks:
            t.cancel()


def make(tmp_path: Path, mcfg: MqttConfig, **ocfg: Any) -> tuple[Outbox, Uplink]:
    ob = Outbox(OutboxConfig(path=str(tmp_path / "outbox.db"), commit_interval_ms=20, **ocfg), GW)
    ob.open()
    return ob, Uplink(mcfg, GW, ob)


def mqtt(b: Mosquitto | Any, **kw: Any) -> MqttConfig:
    return MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5, **kw)


async def test_live_delivery_order_status_and_delete_after_puback(
        tmp_path: Path, mosq: Mosquitto) -> None:
    ob, up = make(tmp_path, mqtt(mosq))
    async with subscribed(mosq.host, mosq.port) as sub, running(ob, up):
        await wait_until(lambda: up.status()["state"] == "connected")
        sent = []
        for i in range(300):
            stream = f"s{i % 3}"
            sent.append(ob.put("window", f"telemetry/{stream}",
                               window_message(GW, window(i, stream))))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await wait_until(lambda: len(sub.seqs()) >= 300)
        assert await up.drain(5)
        ob.flush()
        st = up.status()
    assert sorted(sub.seqs()) == sent
    for k in range(3):
        got = sub.seqs(f"edge/{GW}/telemetry/s{k}")
        assert got == sorted(got) and len(got) == 100
    assert not any(b.get("replayed") for b in sub.feed())
    assert (f"edge/{GW}/status", "online") in [(t, b) for t, b, _ in sub.got]
    assert st["protocol"] == "5" and st["nodelay"] is True and st["acked"] == 300
    assert st["replayed"] == 0 and st["quarantined"] == 0
    assert ob.stats()["rows"] == 0
    # A clean stop leaves "offline" retained on the status topic.
    async with subscribed(mosq.host, mosq.port, f"edge/{GW}/status") as late:
        await wait_until(lambda: bool(late.got))
        assert late.got[0] == (f"edge/{GW}/status", "offline", True)
    ob.close()


async def test_backlog_is_replayed_marked_and_in_order(tmp_path: Path, mosq: Mosquitto) -> None:
    ob, up = make(tmp_path, mqtt(mosq, replay_rate=2000.0))
    old = [ob.put("window", f"telemetry/s{i % 2}", window_message(GW, window(i, f"s{i % 2}")))
           for i in range(60)]
    ob.flush()
    stored = {r.seq: json.loads(r.payload) for r in await ob.fetch(0, ob.accepted_seq, 100)}
    async with subscribed(mosq.host, mosq.port) as sub, running(ob, up):
        await wait_until(lambda: len(sub.seqs()) >= 60)
        new = [ob.put("health", "health", health_message(GW, {"i": i})) for i in range(5)]
        await wait_until(lambda: len(sub.seqs()) >= 65)
        assert await up.drain(5)
    by_seq = {b["seq"]: b for b in sub.feed()}
    for s in old:
        assert by_seq[s]["replayed"] is True
        assert {k: v for k, v in by_seq[s].items() if k != "replayed"} == stored[s]
    for s in new:
        assert "replayed" not in by_seq[s]
    for k in range(2):
        got = sub.seqs(f"edge/{GW}/telemetry/s{k}")
        assert got == sorted(got)
    assert up.status()["replayed"] == 60
    ob.close()


async def test_mqtt5_refused_falls_back_to_311(tmp_path: Path) -> None:
    amqtt_broker = pytest.importorskip("amqtt.broker")
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    port = free_port()
    broker = amqtt_broker.Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {
            "allow_anonymous": True}},
    })
    await broker.start()
    try:
        ob, up = make(tmp_path, MqttConfig(host="127.0.0.1", port=port, reconnect_max_s=0.5))
        # amqtt stalls on an MQTT 5 CONNECT that carries a will instead of refusing it; the
        # uplink then falls back after its probe timeout, shortened here.
        up.connector.probe_timeout_s = 1.0
        async with subscribed("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311) as sub, \
                running(ob, up):
            seqs = [ob.put("health", "health", health_message(GW, {"i": i})) for i in range(20)]
            await wait_until(lambda: len(sub.seqs()) >= 20)
            assert up.status()["protocol"] == "3.1.1"
        assert sorted(sub.seqs()) == seqs
        ob.close()
    finally:
        await broker.shutdown()


async def test_oversized_message_is_quarantined_without_sending(
        tmp_path: Path, mosq: Mosquitto) -> None:
    ob, up = make(tmp_path, mqtt(mosq, max_payload_bytes=512))
    async with subscribed(mosq.host, mosq.port) as sub, running(ob, up):
        a = ob.put("health", "health", health_message(GW, {"i": 1}))
        big = ob.put("health", "health", health_message(GW, {"blob": "x" * 2000}))
        c = ob.put("health", "health", health_message(GW, {"i": 3}))
        await wait_until(lambda: len(sub.seqs()) >= 2 and up.status()["quarantined"] == 1)
        assert await up.drain(5)
        ob.flush()
    assert sub.seqs() == [a, c]
    q = await ob.quarantined_rows()
    assert [r["seq"] for r in q] == [big] and "max_payload_bytes" in q[0]["reason"]
    assert ob.stats()["rows"] == 0 and ob.stats()["quarantined"] == 1
    ob.close()


async def test_refused_puback_is_retried_then_quarantined(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite edge/{GW}/status\ntopic readwrite edge/{GW}/health\n"
                   "topic read edge/#\n")
    b = broker_at(tmp_path / "mosq", extra=f"acl_file {acl}\n")
    try:
        ob, up = make(tmp_path, mqtt(b, poison_attempts=3))
        async with subscribed(b.host, b.port) as sub, running(ob, up):
            ok1 = ob.put("health", "health", health_message(GW, {"i": 1}))
            denied = ob.put("window", "telemetry/secret", window_message(GW, window(1)))
            ok2 = ob.put("health", "health", health_message(GW, {"i": 2}))
            await wait_until(lambda: up.status()["quarantined"] == 1)
            await wait_until(lambda: len(sub.seqs()) >= 2)
            assert await up.drain(5)
            st = up.status()
            ob.flush()
        assert sub.seqs() == [ok1, ok2]
        # mosquitto 2.0 also drops the connection after each refusal; nothing else is blamed.
        assert st["refused"] == 3 and st["blamed"] == 0 and st["state"] == "connected"
        q = await ob.quarantined_rows()
        assert [r["seq"] for r in q] == [denied]
        assert q[0]["attempts"] == 3 and "0x87" in q[0]["reason"]
        ob.close()
    finally:
        b.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_message_that_breaks_the_connection_is_isolated(tmp_path: Path,
                                                              protocol: str) -> None:
    # MQTT 5: mosquitto says DISCONNECT 0x95; 3.1.1: it just closes, and stays up.
    b = broker_at(tmp_path / "mosq", extra="max_packet_size 2000\n")
    try:
        ob, up = make(tmp_path, mqtt(b, poison_attempts=2, protocol=protocol))
        async with subscribed(b.host, b.port) as sub, running(ob, up):
            await wait_until(lambda: up.status()["state"] == "connected")
            before = [ob.put("health", "health", health_message(GW, {"i": i})) for i in range(20)]
            poison = ob.put("health", "health", health_message(GW, {"blob": "y" * 5000}))
            after = [ob.put("health", "health", health_message(GW, {"i": i})) for i in range(20)]
            await wait_until(lambda: up.status()["quarantined"] == 1, 40)
            await wait_until(lambda: len(set(sub.seqs())) >= 40, 10)
            st = up.status()
        assert set(sub.seqs()) == set(before + after)
        assert poison not in sub.seqs()
        assert st["reconnects"] >= 2 and st["blamed"] >= 1
        q = await ob.quarantined_rows()
        assert [r["seq"] for r in q] == [poison]
        assert "closed the connection right after it was sent" in q[0]["reason"]
        ob.close()
    finally:
        b.stop()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
async def test_credentials_file_and_refusal(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Pa55"
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "gateway", secret], check=True,
                   capture_output=True)
    port = free_port()
    b = broker_at(tmp_path / "mosq", port=port, listeners=(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"))
    creds = tmp_path / "creds"
    creds.write_text(f"gateway\n{secret}\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("gateway\nnot-it\n")
    caplog.set_level(logging.DEBUG)
    try:
        ob, up = make(tmp_path, mqtt(b, credentials_file=str(creds)))
        async with subscribed(b.host, b.port, username="gateway", password=secret) as sub, \
                running(ob, up):
            seq = ob.put("health", "health", health_message(GW, {"i": 1}))
            await wait_until(lambda: sub.seqs() == [seq])
        ob.close()
        ob2, bad = make(tmp_path / "x", mqtt(b, credentials_file=str(wrong)))
        async with running(ob2, bad):
            await wait_until(lambda: bad.status()["connect_failures"] >= 2)
            st = bad.status()
        assert st["connects"] == 0 and "refused" in st["last_error"]
        ob2.close()
    finally:
        b.stop()
    assert not any(secret in r.getMessage() or "not-it" in r.getMessage()
                   for r in caplog.records)


async def test_missing_puback_breaks_the_connection_and_the_message_is_resent(
        tmp_path: Path, mosq: Mosquitto) -> None:
    ob, up = make(tmp_path, mqtt(mosq))
    up.puback_timeout_s = 1.0  # far below the keepalive, so it is what notices
    assert mosq.proc is not None
    async with subscribed(mosq.host, mosq.port) as sub, running(ob, up):
        await wait_until(lambda: up.status()["state"] == "connected")
        # The birth message is through (the broker forwarded it), so what hangs next is ours.
        await wait_until(lambda: ("edge/gw-up/status", "online", True) in sub.got
                         or ("edge/gw-up/status", "online", False) in sub.got)
        os.kill(mosq.proc.pid, signal.SIGSTOP)  # the broker hangs: no PUBACK, socket open
        try:
            seq = ob.put("health", "health", health_message(GW, {"i": 1}))
            await wait_until(lambda: "no PUBACK" in up.status()["last_error"])
        finally:
            os.kill(mosq.proc.pid, signal.SIGCONT)
        await wait_until(lambda: seq in sub.seqs(), 20)
        assert await up.drain(10)
        assert up.status()["blamed"] == 0  # the broker hung; the message did nothing wrong
    ob.flush()
    assert ob.stats()["rows"] == 0
    ob.close()


async def test_backlog_pending_counts_rows_not_a_seq_range(tmp_path: Path,
                                                           private_broker: Mosquitto) -> None:
    b = private_broker
    ob, up = make(tmp_path, mqtt(b, replay_rate=2.0))  # a slow replay: the backlog stays
    b.stop()
    for i in range(20):
        ob.put("health", "health", health_message(GW, {"i": i}))
    assert ob.flush()
    async with running(ob, up):
        await wait_until(lambda: up.status()["state"] in ("probing", "waiting"))
        assert up.status()["backlog_pending"] == 20
        b.start()
        await wait_until(lambda: up.status()["acked"] >= 1, 15)
        for _ in range(50):
            st = up.status()
            assert st["backlog_pending"] == 20 - st["acked"] - st["inflight"]
            await asyncio.sleep(0.01)
    ob.close()
