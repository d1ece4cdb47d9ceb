"""The control socket server: protocol, bad input, streaming, socket lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.control.server import ControlServer
from agent.control.tail import TailHub
from agent.supervisor import SensorHealth
from tests.waiting import until

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "docs" / "status.schema.json"


# -- a stand-in for agent.runtime.Agent with the surface the server uses ---------------------

# The rest of a real outbox's stats (agent.outbox.store), for the status snapshot.
OUTBOX_REST: dict[str, Any] = {
    "path": "/var/lib/edge-agent/outbox.db", "boot_id": "b0", "accepted_seq": 3, "next_seq": 4,
    "bytes": 900, "bytes_by_class": {"window": 900}, "pending": 0, "drops_by_reason": {"rows": 4},
    "quarantine_rows": 0, "corrupt_resets": 0, "salvaged": 0, "unreadable": 0, "commits": 10,
    "commit_errors": 0, "last_commit_ms": 0.5, "max_commit_ms": 3.0, "seq_skipped": None}


class FakeOutbox:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def stats(self) -> dict[str, Any]:
        return {"rows": len(self.rows), "depth": {"window": len(self.rows)},
                "oldest_age_s": 42.0, "drops": {"window": 3, "raw": 1}, "quarantined": 0}

    def export(self, path: str) -> int:
        with open(path, "x", encoding="utf-8") as fh:
            for row in self.rows:
                fh.write(json.dumps(row) + "\n")
        return len(self.rows)


class FakePipeline:
    def __init__(self, outbox: FakeOutbox) -> None:
        self.tail = TailHub()
        self.outbox = outbox


class FakeAgent:
    def __init__(self, rows: int = 3) -> None:
        now = time.monotonic()
        bme = SensorHealth("bme", "bme280", state="up", readings=120,
                           last_reading_mono=now - 0.8,
                           last_values={"temperature": (23.41, "degC", "good"),
                                        "humidity": (48.2, "%RH", "good")})
        radar = SensorHealth("radar", "ops243", state="down", readings=5, failures=7,
                             consecutive_failures=4, restarts=7,
                             last_error="SerialTimeout: no frame within 2.0 s",
                             last_reading_mono=now - 95.0,
                             last_values={"speed": (12.5, "m/s", "suspect")})
        self._health = [bme, radar]
        self.outbox = FakeOutbox([{"seq": i, "topic": f"telemetry/env{i}"} for i in range(rows)])
        self.pipeline: FakePipeline | None = FakePipeline(self.outbox)
        self.generation = 1
        self.reloads_ok = 0
        self.reloads_rejected = 0
        self.last_reload_error = ""
        self.reload_requests = 0
        self.accept_reload = True
        self.broken_snapshot = False

    def request_reload(self) -> None:
        self.reload_requests += 1
        if self.accept_reload:
            self.generation += 1
            self.reloads_ok += 1
        else:
            self.reloads_rejected += 1
            self.last_reload_error = "sensors[0].driver: 'nonesuch' is not a known driver"

    def snapshot(self) -> dict[str, Any]:
        if self.broken_snapshot:
            raise RuntimeError("snapshot exploded")
        now = time.monotonic()
        return {
            "agent": {"version": "0.1.0", "gateway": "cabinet-17", "uptime_s": 3725.4,
                      "config_file": "/etc/edge-agent/agent.toml",
                      "generation": self.generation, "reloads_ok": self.reloads_ok,
                      "reloads_rejected": self.reloads_rejected,
                      "last_reload_error": self.last_reload_error},
            "sensors": [h.snapshot(now) for h in self._health],
            "queues": {"readings": {"depth": 0, "maxsize": 4096, "policy": "drop_oldest",
                                    "put": 125, "dropped": 0, "high_water": 2}},
            "pipeline": {"windows": 10, "inferences": 4, "raw": 0, "heartbeat_age_s": 0.1},
            "clean": {"bme.temperature": {"good": 118, "suspect": 2, "bad": 0, "stale": False},
                      "stale": []},
            "clock": {"synced": True},
            "outbox": {**OUTBOX_REST, **self.outbox.stats()},
            "uplink": {"state": "connected", "broker": "mqtt.example.net:8883",
                       "protocol": "5", "tls": True, "last_puback_age_s": 1.5, "inflight": 2,
                       "backlog_pending": 1, "replay_rate": 50.0, "published": 14,
                       "replayed": 0, "acked": 12, "refused": 0, "quarantined": 0,
                       "connects": 1, "reconnects": 0, "connect_failures": 0, "blamed": 0,
                       "probes_refused": 0, "last_error": "", "commands": None},
            "models": {"status": {"models": {"traffic": {
                "version": "3fa2c1d0", "path": "/var/lib/edge-agent/models/traffic.onnx",
                "stream": "traffic", "runtime": "onnxruntime", "runs": 4, "failures": 0,
                "last_outputs": {"congestion": 0.12}}}, "errors": []},
                       "last": {"traffic": {"version": "3fa2c1d0",
                                            "outputs": {"congestion": 0.12, "flow": 840.0},
                                            "latency_ms": 0.4,
                                            "window_start_ns": 1_790_000_000_000_000_000}},
                       "history": None},
        }


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory under /tmp: socket paths must stay below 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="ea-ctl-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(agent: Any, path: Path, **kw: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, agent, **kw)
    task = asyncio.create_task(server.serve(), name="control-under-test")
    try:
        listening = asyncio.create_task(server.listening.wait(), name="listening")
        done, _ = await asyncio.wait({task, listening}, timeout=5.0,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            listening.cancel()
            task.result()
        assert listening in done, "control server did not start listening"
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)


@dataclasses.dataclass
class Ctl:
    server: ControlServer
    agent: FakeAgent
    path: Path


@pytest.fixture
async def control() -> AsyncIterator[Ctl]:
    agent = FakeAgent()
    with short_dir() as d:
        path = d / "run" / "control.sock"
        async with serving(agent, path, group=None, export_dir=d) as server:
            yield Ctl(server, agent, path)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")
        await self.writer.drain()

    async def recv(self) -> dict[str, Any] | None:
        line = await asyncio.wait_for(self.reader.readline(), 5.0)
        return json.loads(line) if line else None

    async def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.send(req)
        reply = await self.recv()
        assert reply is not None, f"connection closed instead of answering {req}"
        return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(path), limit=8 * 1024 * 1024), 5.0)
    conn = Conn(reader, writer)
    try:
        yield conn
    finally:
        await conn.close()


# -- requests and replies -------------------------------------------------------------------

async def test_status_has_every_section_and_matches_the_published_schema(control) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    async with connect(control.path) as c:
        reply = await c.ask({"id": 1, "cmd": "status"})
    assert reply["id"] == 1 and reply["ok"] is True
    snap = reply["result"]
    assert snap["agent"]["gateway"] == "cabinet-17"
    assert [s["name"] for s in snap["sensors"]] == ["bme", "radar"]
    jsonschema.validate(snap, json.loads(SCHEMA_FILE.read_text()))


async def test_status_between_generations_still_has_every_section(control) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    agent_only = {"agent": FakeAgent().snapshot()["agent"]}  # no pipeline running
    control.agent.snapshot = lambda: agent_only
    async with connect(control.path) as c:
        snap = (await c.ask({"id": 2, "cmd": "status"}))["result"]
    assert snap["sensors"] == [] and snap["clock"] == {"synced": None}
    jsonschema.validate(snap, json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize(("payload", "needle"), [
    (b"this is not json\n", "not valid JSON"),
    (b"[1, 2, 3]\n", "must be a JSON object"),
    (b'{"id": 4, "cmd": "format-disk"}\n', "cmd"),
    (b'{"id": 5, "cmd": "status", "sudo": true}\n', "sudo: unknown key"),
    (b'{"id": 6, "cmd": "tail", "args": {"match": 5}}\n', "tail: args.match"),
    (b'{"id": 7, "cmd": "status", "args": {"verbose": 1}}\n', "args.verbose: unknown key"),
    (b'{"id": 8, "cmd": "status", "args": []}\n', "args"),
    (b'\xff\xfe{"cmd": "status"}\n', "not valid JSON"),
])
async def test_bad_requests_get_an_error_and_the_connection_keeps_working(control, payload,
                                                                         needle) -> None:
    async with connect(control.path) as c:
        await c.send(payload)
        err = await c.recv()
        assert err is not None and err["ok"] is False
        assert err["error"]["code"] == "bad_request"
        assert needle in err["error"]["message"], err
        ok = await c.ask({"id": 99, "cmd": "sensors.list"})
    assert ok["ok"] is True and ok["id"] == 99
    assert control.server.errors == 1


async def test_request_id_of_a_bad_request_is_echoed_when_readable(control) -> None:
    async with connect(control.path) as c:
        err = await c.ask({"id": "abc", "cmd": "nope"})
    assert err["id"] == "abc" and err["ok"] is False


async def test_oversized_request_is_refused_and_the_server_keeps_serving(control) -> None:
    async with connect(control.path) as c:
        await c.send(b'{"id": 1, "cmd": "status", "args": {"x": "' + b"A" * 100_000 + b'"}}\n')
        err = await c.recv()
        assert err is not None and err["error"]["code"] == "too_large"
        assert "65536" in err["error"]["message"]
        assert await c.recv() is None, "the connection should be closed after an overrun"
    async with connect(control.path) as c:
        assert (await c.ask({"id": 2, "cmd": "status"}))["ok"] is True


async def test_a_failing_command_is_reported_and_does_not_stop_the_server(control) -> None:
    control.agent.broken_snapshot = True
    async with connect(control.path) as c:
        err = await c.ask({"id": 1, "cmd": "status"})
        assert err["error"]["code"] == "failed"
        assert "snapshot exploded" in err["error"]["message"]
        control.agent.broken_snapshot = False
        assert (await c.ask({"id": 2, "cmd": "status"}))["ok"] is True


async def test_several_requests_on_one_connection(control) -> None:
    async with connect(control.path) as c:
        for i, cmd in enumerate(["status", "sensors.list", "outbox.stats", "reload"]):
            reply = await c.ask({"id": i, "cmd": cmd})
            assert reply["ok"] is True and reply["id"] == i
    assert control.agent.reload_requests == 1


async def test_sensors_list_filters_by_name(control) -> None:
    async with connect(control.path) as c:
        one = await c.ask({"id": 1, "cmd": "sensors.list", "args": {"name": "radar"}})
        missing = await c.ask({"id": 2, "cmd": "sensors.list", "args": {"name": "nope"}})
    assert [s["name"] for s in one["result"]["sensors"]] == ["radar"]
    assert missing["error"]["code"] == "not_found" and "'nope'" in missing["error"]["message"]


async def test_outbox_commands_without_a_pipeline_say_so(control) -> None:
    control.agent.pipeline = None
    async with connect(control.path) as c:
        err = await c.ask({"id": 1, "cmd": "outbox.stats"})
    assert err["error"]["code"] == "unavailable"


async def test_outbox_export_streams_the_file_and_cleans_up(control) -> None:
    import base64
    import hashlib

    async with connect(control.path) as c:
        await c.send({"id": 3, "cmd": "outbox.export"})
        events = []
        while (ev := await c.recv()) is not None:
            events.append(ev)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "begin" and kinds[-1] == "end" and set(kinds[1:-1]) <= {"chunk"}
    data = b"".join(base64.b64decode(e["data"]) for e in events if e["event"] == "chunk")
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert rows == control.agent.outbox.rows
    assert events[-1]["rows"] == 3 and events[-1]["bytes"] == len(data)
    assert events[-1]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(control.path.parent.parent.glob("outbox-export-*")), "staging dir left behind"


async def test_too_many_streaming_clients_are_refused(control) -> None:
    control.server.max_clients = 2
    async with connect(control.path) as a, connect(control.path) as b:
        await _tail(a)
        await _tail(b)
        async with connect(control.path) as c:
            err = await c.recv()
    assert err is not None and err["error"]["code"] == "busy"


async def test_idle_connections_cannot_lock_others_out(control) -> None:
    """Many connections that connect and say nothing: a real client is still answered, at
    once, because the longest-idle one makes room."""
    n = control.server.max_clients * 2
    async with contextlib.AsyncExitStack() as stack:
        idle = [await stack.enter_async_context(connect(control.path)) for _ in range(n)]
        for _ in range(3):
            async with connect(control.path) as c:
                reply = await c.ask({"id": 1, "cmd": "status"})
            assert reply["ok"], reply
        assert control.server.evicted >= n - control.server.max_clients
        closed = 0
        for conn in idle:  # the evicted ones see the connection end, without a reply
            with contextlib.suppress(ConnectionError):
                if await conn.recv() is None:
                    closed += 1
                    if closed == control.server.evicted:
                        break
        assert closed == control.server.evicted


async def test_an_idle_connection_is_closed_after_the_idle_timeout(control) -> None:
    control.server.idle_timeout_s = 0.2
    async with connect(control.path) as c:
        assert (await c.ask({"id": 1, "cmd": "status"}))["ok"]
        assert await c.recv() is None  # closed by the server, within recv's 5 s bound


# -- tail -----------------------------------------------------------------------------------

async def _tail(c: Conn, match: str = "") -> None:
    await c.send({"id": "t", "cmd": "tail", "args": {"match": match}})
    first = await c.recv()
    assert first is not None and first["event"] == "subscribed"


async def test_tail_streams_matching_items_until_the_client_leaves(control) -> None:
    hub = control.agent.pipeline.tail
    async with connect(control.path) as c:
        await _tail(c, "bme")
        await until(lambda: hub.active, 5.0, "tail subscription")
        hub.publish("reading", "radar", {"quantity": "speed", "value": 3.0})
        hub.publish("reading", "bme", {"quantity": "temperature", "value": 21.5})
        hub.publish("window", "bme", {"start_ns": 1, "channels": {}})
        got = [await c.recv(), await c.recv()]
    assert [(g["item"]["kind"], g["item"]["name"]) for g in got] == [("reading", "bme"),
                                                                      ("window", "bme")]
    assert got[0]["item"]["value"] == 21.5
    await until(lambda: not hub.active, 5.0, "unsubscribe after disconnect")


async def test_tail_follows_a_reloaded_pipeline(control) -> None:
    old_hub = control.agent.pipeline.tail
    async with connect(control.path) as c:
        await _tail(c)
        await until(lambda: old_hub.active, 5.0, "first subscription")
        control.agent.pipeline = FakePipeline(control.agent.outbox)  # what a reload does
        new_hub = control.agent.pipeline.tail
        await until(lambda: new_hub.active, 5.0, "subscription moved to the new pipeline")
        assert not old_hub.active
        new_hub.publish("inference", "traffic", {"outputs": {"congestion": 0.5}})
        item = await c.recv()
    assert item is not None and item["item"]["name"] == "traffic"


async def test_slow_tail_client_loses_oldest_items_and_is_told(control) -> None:
    hub = control.agent.pipeline.tail
    async with connect(control.path) as c:
        await _tail(c)
        await until(lambda: hub.active, 5.0, "tail subscription")
        # Everything published between two server wake-ups lands in the bounded queue at once.
        for i in range(5000):
            hub.publish("reading", "bme", {"value": float(i)})
        events: list[dict[str, Any]] = []
        while not events or events[-1].get("item", {}).get("value") != 4999.0:
            ev = await c.recv()
            assert ev is not None
            events.append(ev)
    dropped = [e for e in events if e["event"] == "dropped"]
    items = [e for e in events if e["event"] == "item"]
    assert dropped and dropped[0]["count"] == 4000
    assert len(items) == 1000, "the per-client queue bound is 1000 items"
