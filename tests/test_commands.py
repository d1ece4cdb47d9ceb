"""Cloud commands: validation and dispatch, then end to end through a real mosquitto."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config.schema import MqttConfig, OutboxConfig
from agent.feed.messages import health_message
from agent.outbox.store import Outbox
from agent.uplink.commands import CommandDispatcher, CommandError, encode_result
from agent.uplink.forwarder import Uplink
from tests.test_uplink import broker_at, running, subscribed, wait_until

GW = "gw-cmd"


async def sensors_read(args: dict[str, Any]) -> dict[str, Any]:
    if args["name"] not in (None, "bme"):
        raise ValueError(f"no sensor named {args['name']!r}")
    return {"sensors": [{"name": "bme", "state": "up"}]}


async def model_activate(args: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("model store exploded")


async def config_get(args: dict[str, Any]) -> Any:
    await asyncio.sleep(60)  # longer than the dispatcher allows


def dispatcher(**kw: Any) -> CommandDispatcher:
    # Signatures are tested in test_commands_envelope; here the handlers' side of dispatch.
    return CommandDispatcher({"sensors.read": sensors_read, "model.activate": model_activate,
                              "config.get": config_get}, require_signature=False, **kw)


async def test_valid_command_gets_a_result() -> None:
    d = dispatcher()
    r = await d.handle(GW, "sensors.read", b'{"id": "c-1", "args": {"name": "bme"}}')
    assert r.ok and r.id == "c-1" and r.result == {"sensors": [{"name": "bme", "state": "up"}]}
    body = json.loads(encode_result(r))
    assert body["schema"] == "edge-agent/cmd-result/1" and body["gateway"] == GW
    r = await d.handle(GW, "ping", b'{"id": "p"}')
    assert r.ok and r.result["pong"] is True


@pytest.mark.parametrize(("name", "payload", "code", "req_id"), [
    ("ping", b"x" * 20_000, "too_large", None),
    ("ping", b"{not json", "malformed", None),
    ("ping", b"\xff\xfe", "malformed", None),
    ("ping", b"[1, 2]", "invalid_request", None),
    ("ping", b'{"args": {}}', "invalid_request", None),
    ("ping", b'{"id": "has space"}', "invalid_request", "has space"),
    ("ping", b'{"id": "a", "extra": 1}', "invalid_request", "a"),
    ("reboot", b'{"id": "r1"}', "unknown_command", "r1"),
    ("ping", b'{"id": "b1", "args": {"x": 1}}', "bad_args", "b1"),
    ("model.activate", b'{"id": "m1", "args": {}}', "bad_args", "m1"),
    ("sensors.read", b'{"id": "s2", "args": {"name": "nope"}}', "failed", "s2"),
    ("model.activate", b'{"id": "m2", "args": {"name": "m"}}', "internal", "m2"),
    ("outbox.stats", b'{"id": "o1"}', "unavailable", "o1"),
])
async def test_bad_requests_get_error_replies(name: str, payload: bytes, code: str,
                                              req_id: str | None) -> None:
    r = await dispatcher().handle(GW, name, payload)
    assert not r.ok and r.error is not None
    assert r.error.code == code and r.id == req_id and r.error.message


async def test_timeout_and_busy() -> None:
    d = dispatcher(timeout_s=0.05, max_running=1)
    slow = asyncio.ensure_future(d.handle(GW, "config.get", b'{"id": "t1"}'))
    await wait_until(lambda: d.running == 1, 2)
    busy = await d.handle(GW, "config.get", b'{"id": "t2"}')
    assert busy.error is not None and busy.error.code == "busy"
    timed = await asyncio.wait_for(slow, 2)
    assert timed.error is not None and timed.error.code == "timeout" and d.running == 0


async def test_handler_results_must_be_json_and_names_allow_listed() -> None:
    async def weird(args: dict[str, Any]) -> Any:
        return {"x": {1, 2}}

    async def refuse(args: dict[str, Any]) -> Any:
        raise CommandError("not now")

    d = CommandDispatcher({"sensors.read": weird, "model.activate": refuse},
                          require_signature=False)
    r = await d.handle(GW, "sensors.read", b'{"id": "w"}')
    assert r.error is not None and r.error.code == "internal" and "JSON" in r.error.message
    r = await d.handle(GW, "model.activate", b'{"id": "n", "args": {"name": "m"}}')
    assert r.error is not None and (r.error.code, r.error.message) == ("failed", "not now")
    with pytest.raises(ValueError, match="not an allowed command"):
        CommandDispatcher({"shell": weird})


async def test_commands_end_to_end_and_the_uplink_keeps_running(tmp_path: Path) -> None:
    b = broker_at(tmp_path / "mosq")
    try:
        ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
        ob.open()
        up = Uplink(MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5), GW, ob,
                    dispatcher())
        base = f"edge/{GW}/cmd"
        async with subscribed(b.host, b.port, f"{base}/+/result") as sub, running(ob, up):
            await wait_until(lambda: up.status()["state"] == "connected")
            await wait_until(lambda: up.status()["commands"] is not None)
            requests = [
                ("ping", b'{"id": "ok-1"}'),
                ("outbox.stats", b'{"id": "ok-2"}'),
                ("reboot", b'{"id": "bad-1"}'),
                ("ping", b"{{{"),
                ("ping", b'{"id": "big", "args": {"pad": "' + b"x" * 20_000 + b'"}}'),
                ("sensors.read", b'{"id": "bad-2", "args": {"name": 5}}'),
            ]
            async with aiomqtt.Client(b.host, b.port, identifier="cloud-cmd") as cloud:
                for name, payload in requests:
                    await cloud.publish(f"{base}/{name}", payload, qos=1)
            await wait_until(lambda: len(sub.got) >= len(requests))
            # After all that, the feed still flows.
            seq = ob.put("health", "health", health_message(GW, {"after": "commands"}))
            await wait_until(lambda: ob.accepted_seq >= seq and up.status()["acked"] >= 1)
            st = up.status()
        ob.close()
    finally:
        b.stop()
    got = {(t.split("/")[3], body["id"], body["ok"], (body["error"] or {}).get("code"))
           for t, body, _ in sub.got}
    assert got == {
        ("ping", "ok-1", True, None),
        ("outbox.stats", "ok-2", True, None),
        ("reboot", "bad-1", False, "unknown_command"),
        ("ping", None, False, "malformed"),
        ("ping", None, False, "too_large"),
        ("sensors.read", "bad-2", False, "bad_args"),
    }
    stats = next(body for t, body, _ in sub.got if body["id"] == "ok-2")
    assert "depth" in stats["result"] and "drops" in stats["result"]
    assert st["state"] == "connected" and st["reconnects"] == 0
    assert st["commands"]["ok"] == 2 and st["commands"]["error"] == 4


@pytest.mark.parametrize(("payload", "why"), [
    (b'{"id": "d", "args": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested"),
    (b"[" * 1500, "nested"),
    (b'{"id": "n", "args": {"x": NaN}}', "NaN"),
    (b'{"id": "i", "args": {"x": Infinity}}', "Infinity"),
    (b'{"id": "f", "args": {"x": 1e999}}', "too large for a float"),
    (b'{"id": "h", "args": {"x": ' + b"9" * 4000 + b"}}", "digits"),
    (b'{"id": "s", "args": {"x": "\\ud800"}}', "surrogate"),
])
async def test_hostile_json_is_refused_before_it_can_raise(payload: bytes, why: str) -> None:
    d = dispatcher(max_bytes=64 * 1024)
    r = await d.handle(GW, "ping", payload)
    assert not r.ok and r.error is not None
    assert r.error.code == "malformed" and why in r.error.message
    encode_result(r)  # and the reply itself can be sent


async def test_a_repeated_id_is_answered_from_the_cache_without_running_again() -> None:
    runs: list[str] = []

    async def activate(args: dict[str, Any]) -> dict[str, Any]:
        runs.append(args["name"])
        await asyncio.sleep(0.05)
        return {"active": args["name"], "run": len(runs)}

    d = CommandDispatcher({"model.activate": activate}, require_signature=False)
    req = b'{"id": "a-1", "args": {"name": "traffic"}}'
    # A repeat that arrives while the first still runs waits for the first reply.
    first, second = await asyncio.gather(d.handle(GW, "model.activate", req),
                                         d.handle(GW, "model.activate", req))
    third = await d.handle(GW, "model.activate", req)
    assert runs == ["traffic"]
    assert first.result == second.result == third.result == {"active": "traffic", "run": 1}
    assert d.stats()["repeated"] == 2
    other = await d.handle(GW, "model.activate", b'{"id": "a-2", "args": {"name": "energy"}}')
    assert other.result == {"active": "energy", "run": 2}
    # The cache is bounded: an id pushed out by newer ones runs again.
    for i in range(300):
        await d.handle(GW, "ping", b'{"id": "p-%d"}' % i)
    again = await d.handle(GW, "model.activate", req)
    assert again.result == {"active": "traffic", "run": 3}


async def test_a_retained_command_is_not_run_and_is_counted() -> None:
    runs: list[str] = []

    async def activate(args: dict[str, Any]) -> dict[str, Any]:
        runs.append(args["name"])
        return {}

    d = CommandDispatcher({"model.activate": activate})
    r = await d.handle(GW, "model.activate", b'{"id": "r-1", "args": {"name": "m"}}',
                       retained=True)
    assert not r.ok and r.error is not None and r.error.code == "retained"
    assert "retained" in r.error.message and r.id == "r-1"
    assert runs == [] and d.stats()["retained"] == 1


async def test_hostile_retained_commands_never_cost_the_session(tmp_path: Path) -> None:
    b = broker_at(tmp_path / "mosq")
    base = f"edge/{GW}/cmd"
    deep = b'{"id": "deep", "args": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    try:
        async with aiomqtt.Client(b.host, b.port, identifier="cloud-retain") as cloud:
            # Published retained before the gateway connects: the broker hands them to every
            # new session of the gateway.
            await cloud.publish(f"{base}/ping", deep, qos=1, retain=True)
            await cloud.publish(f"{base}/sensors.read", b'{"id": "old", "args": {}}', qos=1,
                                retain=True)
        ob = Outbox(OutboxConfig(path=str(tmp_path / "o.db"), commit_interval_ms=20), GW)
        ob.open()
        up = Uplink(MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5), GW, ob,
                    dispatcher())
        async with subscribed(b.host, b.port, f"{base}/+/result") as sub, running(ob, up):
            await wait_until(lambda: len(sub.got) >= 2, 10)
            async with aiomqtt.Client(b.host, b.port, identifier="cloud-live") as cloud:
                await cloud.publish(f"{base}/ping", deep, qos=1)
                await cloud.publish(f"{base}/ping", b'{"id": "live"}', qos=1)
            await wait_until(lambda: len(sub.got) >= 4, 10)
            seqs = [ob.put("health", "health", health_message(GW, {"i": i})) for i in range(5)]
            await wait_until(lambda: up.status()["acked"] >= len(seqs), 10)
            st = up.status()
        ob.close()
    finally:
        b.stop()
    got = sorted((str(body["id"]), body["ok"], str((body["error"] or {}).get("code")))
                 for _t, body, _r in sub.got)
    assert got == [("None", False, "malformed"), ("None", False, "malformed"),
                   ("live", True, "None"), ("old", False, "retained")]
    assert st["connects"] == 1 and st["reconnects"] == 0
    assert st["commands"]["retained"] == 1
