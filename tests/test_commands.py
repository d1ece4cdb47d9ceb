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
    return CommandDispatcher({"sensors.read": sensors_read, "model.activate": model_activate,
                              "config.get": config_get}, **kw)


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

    d = CommandDispatcher({"sensors.read": weird, "model.activate": refuse})
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
