"""Every message type a running agent publishes, as a cloud subscriber receives it from a real
mosquitto, validated against its standalone schema in docs/schemas/ and against its model
(which refuses undocumented fields).

The energy stream's meters are played in by the test on a stepped clock (60 s windows, a day's
worth of minutes in a few seconds), so the anomaly detectors see enough windows to open an
event; a synthetic sensor on a stream with two audiences (one gets raw readings, one windows
with fields withheld), the shipped energy model, the health loop and cloud commands give the
rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest
from pydantic import BaseModel

from agent.cli.main import main
from agent.feed import messages as feed
from agent.feed.numbers import rounded
from agent.health import HealthSnapshot
from agent.readings import Reading
from agent.uplink.commands import SCHEMA_RESULT, CommandRequest
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until, write_toml
from tests.test_feed import load_generator

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "docs" / "schemas"
S = 10**9
T0 = 1_741_000_000  # 2025-03-03 11:06 UTC: daylight in Berlin, lamps are expected off
METERS = ("meter", "check", "lights", "cp1", "cp2")

GEN = load_generator()
# The `schema` field of each JSON message type the gateway publishes -> its file and model: the
# generator's list, so a new message type is checked here as soon as it has a schema file.
TYPES: dict[str, tuple[str, type[BaseModel]]] = {
    m.model.model_json_schema(by_alias=True)["properties"]["schema"]["const"]: (m.name, m.model)
    for m in GEN.MESSAGES if m.direction == GEN.PUBLISHED}
REQUEST = "cmd-request"  # what the cloud sends, seen here because the test subscribes to it


class SteppedClock:
    """Wall time set by the test; monotonic time moves with it."""

    def __init__(self, wall_ns: int) -> None:
        self.now = wall_ns
        self._offset = time.monotonic_ns() - wall_ns

    def wall_ns(self) -> int:
        return self.now

    def mono_ns(self) -> int:
        return self.now + self._offset

    def synced(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def cloud(broker: Mosquitto) -> AsyncIterator[tuple[aiomqtt.Client, list[tuple[str,
                                                                                    bytes]]]]:
    """A subscriber to everything of the gateway: (topic, payload) as received."""
    got: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="feed-live") as client:
        await client.subscribe("t/gw-test/#", qos=1, timeout=10)

        async def pump() -> None:
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                got.append((m.topic.value, payload))

        task = asyncio.create_task(pump(), name="feed-live-reader")
        try:
            yield client, got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def energy_minute(k: int, offset: int) -> list[Reading]:
    """Minute ``k`` of a cabinet whose feed meter froze at k = 10 while the check meter, which
    sees the same load, keeps moving; nothing on the lamps or the chargers."""
    start = (T0 + 60 * k) * S
    load = 800.0 + 37.0 * (k % 7)
    out = []
    for j in range(6):
        t = start + (5 + 10 * j) * S
        values = {"meter": load + j if k < 10 else 1234.5 + (j % 2) * 0.5,
                  "check": load + j, "lights": 0.0, "cp1": 0.0, "cp2": 0.0}
        out += [Reading(n, "active_power", values[n], "W", t, t + offset) for n in METERS]
    return out


def schema_of(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))


def undocumented(value: Any, schema: dict[str, Any], defs: dict[str, Any],
                 path: str = "") -> list[str]:
    """Fields of ``value`` that its schema does not name: in an object with named fields, a key
    that is none of them (a map of named things, such as sensors by name, is not checked)."""
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    for branch in schema.get("anyOf", ()):
        if branch.get("type") != "null" and (isinstance(value, dict) or "$ref" not in branch):
            return undocumented(value, branch, defs, path)
    out = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        more = schema.get("additionalProperties")
        for k, v in value.items():
            if k in props:
                out += undocumented(v, props[k], defs, f"{path}.{k}")
            elif isinstance(more, dict) and more:
                out += undocumented(v, more, defs, f"{path}.{k}")
            elif props:
                out.append(f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += undocumented(v, schema["items"], defs, f"{path}[{i}]")
    return out


# Raw readings travel in one of two forms, chosen per gateway: each run sees one of them.
OTHER_RAW = {"batch": feed.SCHEMA_READING, "reading": feed.SCHEMA_RAW_BATCH}


@pytest.mark.parametrize("raw_format", ["batch", "reading"])
async def test_every_message_type_validates_against_its_published_schema(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str],
        raw_format: str) -> None:
    expected = set(TYPES) - {OTHER_RAW[raw_format]}
    clock = SteppedClock(T0 * S)
    data = make_config(
        tmp_path, broker.port,
        gateway={"id": "gw-test", "latitude": 52.5, "longitude": 13.4,
                 "timezone": "Europe/Berlin"},
        sensors=[*({"name": n, "driver": "synthetic", "enabled": False} for n in METERS),
                 {"name": "gen", "driver": "synthetic", "period_s": 0.2}],
        streams=[{"name": "energy", "sensors": list(METERS), "window_s": 60,
                  "anomaly": {"main": "meter.active_power", "check": "check.active_power",
                              "lights": "lights.active_power",
                              "chargers": ["cp1.active_power", "cp2.active_power"]}},
                 # Per-audience copies, one with fields withheld and rounded.
                 {"name": "air", "sensors": ["gen"], "window_s": 60, "audiences": [
                     {"name": "city", "share": "raw"},
                     {"name": "public", "share": "window", "drop": ["channels.*.std"]}]}],
        models=[{"name": "energy", "stream": "energy"}],
        runtime={"health_period_s": 0.5, "clock": "trust"}, raw={"format": raw_format})
    # Run from a file, as a gateway does: health then also reports config deployments.
    path = write_toml(tmp_path / "agent.toml", data)
    async with cloud(broker) as (client, got), \
            running_agent(data, config_path=path, clock=clock) as agent:
        p = agent.pipeline
        assert p is not None
        offset = clock.mono_ns() - clock.wall_ns()
        # The gateway's session is clean: a command sent before it subscribed is not run, so
        # ask until it answers (a repeated id is answered from its replay cache, not re-run).
        for _ in range(20):
            await client.publish("t/gw-test/cmd/ping", b'{"id": "c-1"}', qos=1)
            with contextlib.suppress(AssertionError):
                await until(lambda: "c-1" in replies(got), 0.5, "the first reply")
                break
        await client.publish("t/gw-test/cmd/ping", b'{"id": "c-2", "args": {"x": 1}}', qos=1)
        await client.publish("t/gw-test/cmd/sensors.read",
                             b'{"id": "c-3", "args": {"name": "gen"}}', qos=1)
        for k in range(30):
            clock.now = (T0 + 60 * k + 59) * S
            for r in energy_minute(k, offset):
                assert p.readings.put(r)
            await until(lambda: len(p.readings) == 0, 10, f"minute {k} taken")
        clock.now = (T0 + 60 * 32) * S

        def kinds() -> set[str]:
            return {b.get("schema", REQUEST) for b in _bodies(got)}

        await until(lambda: expected <= kinds() and {"c-1", "c-2", "c-3"} <= replies(got).keys(),
                    30, "every message type at the broker")
        sock = data["control"]["socket"]
        assert await asyncio.to_thread(main, ["status", "--json", "--socket", sock]) == 0
        status_json = json.loads(capsys.readouterr().out)

    status = [payload for topic, payload in got if topic == "t/gw-test/status"]
    assert status and set(status) <= {b"online", b"offline"}  # plain text, not JSON
    checked: dict[str, int] = {}
    for body in _bodies(got):
        name, model = TYPES.get(body.get("schema", ""), (REQUEST, CommandRequest))
        jsonschema.validate(body, schema_of(name))
        model.model_validate(body)
        missing = undocumented(body, schema_of(name), schema_of(name).get("$defs", {}))
        assert missing == [], (f"{name}: fields its schema does not name: {missing} (add them "
                               "to the model, agent/health.py for health, then run "
                               "python docs/gen_mqtt_schemas.py)")
        checked[name] = checked.get(name, 0) + 1
    assert set(checked) == {REQUEST, *(TYPES[k][0] for k in expected)}, checked
    # One contract for the health body and `status --json`: each validates against both files.
    health = [b["health"] for b in _bodies(got) if b.get("schema") == feed.SCHEMA_HEALTH]
    status_schema = json.loads((ROOT / "docs" / "status.schema.json").read_text())
    message = schema_of("health")
    as_health = {**message["properties"]["health"], "$defs": message["$defs"]}
    for body in [*health, status_json]:
        jsonschema.validate(body, status_schema)
        jsonschema.validate(body, as_health)
        HealthSnapshot.model_validate(body)
        missing = undocumented(body, status_schema, status_schema["$defs"])
        assert missing == [], f"add {missing} to agent/health.py"
    assert all(body[s] for body in health for s in ("pipeline", "outbox", "uplink", "models",
                                                     "config_apply"))
    public = [json.loads(payload) for topic, payload in got
              if topic.startswith("t/gw-test/public/telemetry/")]
    assert public and all("redacted" in w["flags"] for w in public)
    assert any(topic.startswith("t/gw-test/city/raw/") for topic, _ in got)
    results = replies(got)
    assert results["c-1"]["ok"] is True and results["c-2"]["error"]["code"] == "bad_args"
    # Values in the feed follow its rounding rule, in replies as in messages.
    values = [v for s in results["c-3"]["result"]["sensors"] for v in s["last_values"].values()]
    values += [v for h in health for s in h["sensors"] for v in s["last_values"].values()]
    assert values and all(v["value"] == rounded(v["value"], v["unit"]) for v in values)
    windows = [b for b in _bodies(got) if b.get("schema") == feed.SCHEMA_WINDOW]
    means = [(c["mean"], c["unit"]) for w in windows for c in w["channels"].values()
             if c["mean"] is not None]
    assert means and all(m == rounded(m, u) for m, u in means)


def _bodies(got: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    out = []
    for topic, payload in list(got):
        if topic == "t/gw-test/status":
            continue
        body = json.loads(payload)  # every other payload is JSON, or this fails
        assert isinstance(body, dict), topic
        out.append(body)
    return out


def replies(got: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    return {b["id"]: b for b in _bodies(got) if b.get("schema") == SCHEMA_RESULT}
