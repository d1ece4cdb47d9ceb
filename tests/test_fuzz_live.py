"""Hostile requests to the running agent: cloud commands over a live mosquitto, and control
socket lines to a running agent's control server.

Commands: every payload gets exactly one reply, the uplink keeps its one connection (session
drops = connections beyond the first) and telemetry keeps flowing. Control: every line gets a
clear error reply (or a result, for a valid request), the server stays up. The table is
printed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config.schema import MqttConfig, OutboxConfig
from agent.feed.messages import health_message
from agent.outbox.store import Outbox
from agent.uplink.commands import CommandDispatcher
from agent.uplink.forwarder import Uplink
from tests import hostile
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent
from tests.test_uplink import running, subscribed
from tests.waiting import until

GW = "gw-fuzz"
COMMANDS = ("ping", "config.get", "sensors.read", "model.activate", "outbox.stats", "nope")
PAYLOADS = 300  # CI; each is one publish and one reply
LINES = 300


@pytest.fixture(scope="module", autouse=True)
def summary_table(request: pytest.FixtureRequest) -> Iterator[None]:
    with hostile.printed(request, "fuzz summary: requests to a running agent"):
        yield


def strict_json(raw: bytes) -> Any:
    """What an accepted request must be: plain JSON with finite numbers."""
    def refuse(name: str) -> Any:
        raise ValueError(name)

    value = json.loads(raw, parse_constant=refuse)
    json.dumps(value, allow_nan=False)
    return value


async def _handler(args: dict[str, Any]) -> dict[str, Any]:
    return {"args": args}


async def test_hostile_command_payloads_cost_one_reply_each_and_no_session(
        tmp_path: Path, private_broker: Mosquitto) -> None:
    b = private_broker
    t = hostile.tally("cloud commands (live mosquitto)")
    payloads = hostile.drawn(hostile.hostile_bytes(("id", "args")), PAYLOADS)
    # Valid requests among them: they must still be served.
    payloads[::15] = [b'{"id": "fine-%d"}' % i for i in range(len(payloads[::15]))]
    rng = random.Random(16)
    ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
    ob.open()
    up = Uplink(MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5), GW, ob,
                CommandDispatcher({"config.get": _handler, "sensors.read": _handler,
                                   "model.activate": _handler}))
    base = f"edge/{GW}/cmd"
    produced: list[int] = []

    async def produce() -> None:
        for i in range(10**6):
            produced.append(ob.put("health", "health", health_message(GW, {"i": i})))
            await asyncio.sleep(0.05)

    async with subscribed(b.host, b.port, f"{base}/+/result") as sub, running(ob, up):
        await until(lambda: up.status()["state"] == "connected", 10, "connected")
        producer = asyncio.create_task(produce(), name="producer")
        try:
            async with aiomqtt.Client(b.host, b.port, identifier="fuzz-cloud") as cloud:
                for p in payloads:
                    valid = p.startswith(b'{"id": "fine-')
                    await cloud.publish(f"{base}/{'ping' if valid else rng.choice(COMMANDS)}",
                                        p, qos=1, retain=not valid and rng.random() < 0.1)
            await until(lambda: len(sub.got) >= len(payloads), 60, "a reply to every payload")
            acked = up.status()["acked"]
            await until(lambda: up.status()["acked"] > acked + 5, 10, "telemetry still flows")
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        ob.flush()
        await until(lambda: ob.stats()["rows"] == 0, 20, "every health message acknowledged")
        st = up.status()
    ob.close()
    replies = [body for _t, body, _r in sub.got]
    for p, reply in zip(payloads, replies, strict=False):
        del p  # replies are matched by count: one each (order is the broker's)
        t.run(lambda r=reply: r, (), check=lambda r: isinstance(r, dict) and "ok" in r,
              rejected=lambda r: isinstance(r, dict) and r.get("ok") is False)
    t.cases += max(0, len(payloads) - len(replies))
    t.foreign += max(0, len(payloads) - len(replies)) + up.lane.failures
    t.drops = st["connects"] - 1
    for reply in replies:  # an accepted command was a valid request
        if reply.get("ok"):
            assert reply["name"] in COMMANDS
    assert len(replies) == len(payloads)
    assert sum(1 for r in replies if r.get("ok")) <= sum(
        1 for p in payloads if _plain(p))
    fine = {r["id"] for r in replies if r.get("ok") and str(r.get("id")).startswith("fine-")}
    assert len(fine) == len(payloads[::15])  # the valid ones were served
    t.assert_clean()
    assert st["quarantined"] == 0 and st["acked"] >= len(produced)


def _plain(p: bytes) -> bool:
    try:
        v = strict_json(p)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return False
    return isinstance(v, dict)


@contextlib.asynccontextmanager
async def control(path: Path) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_hostile_control_lines_get_clear_errors_and_the_server_stays_up(
        tmp_path: Path, broker: Mosquitto) -> None:
    t = hostile.tally("control socket requests (running agent)")
    lines = [p.replace(b"\n", b" ").replace(b"\r", b" ")
             for p in hostile.drawn(hostile.hostile_bytes(("id", "cmd", "args")), LINES)]
    lines = [x for x in lines if x.strip()]  # a blank line is no request
    lines[::20] = [b'{"id": %d, "cmd": "status"}' % i for i in range(len(lines[::20]))]
    data = make_config(tmp_path, broker.port)
    async with running_agent(data) as agent:
        sock = Path(data["control"]["socket"])
        conn: Any = None
        stack = contextlib.AsyncExitStack()
        async with stack:
            for line in lines:
                if conn is None:
                    conn = await stack.enter_async_context(control(sock))
                reader, writer = conn
                writer.write(line + b"\n")
                await writer.drain()
                reply_line = await asyncio.wait_for(reader.readline(), 10)

                def classify(raw: bytes = reply_line, sent: bytes = line) -> dict[str, Any]:
                    reply: dict[str, Any] = json.loads(raw)
                    if reply.get("ok"):
                        strict_json(sent)  # raises (a foreign error) if junk was accepted
                    else:
                        assert reply["error"]["code"] and reply["error"]["message"]
                    return reply

                t.run(classify, (), rejected=lambda r: r.get("ok") is False)
                if not reply_line or b"too_large" in reply_line:
                    conn = None  # the server closes the connection after these
            reader, writer = await stack.enter_async_context(control(sock))
            writer.write(b'{"id": 1, "cmd": "status"}\n')
            await writer.drain()
            status = json.loads(await asyncio.wait_for(reader.readline(), 10))
        assert agent.generation == 1
    assert status["ok"] is True and status["id"] == 1
    assert t.cases == len(lines) and t.accepted == len(lines[::20])
    t.assert_clean()
