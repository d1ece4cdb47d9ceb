"""The web server against hostile clients, the token rules, and /metrics parsed by
prometheus_client's own parsers (the oracle for the hand-written exposition)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from agent.config.load import ConfigError, parse_config
from agent.config.services import WebConfig
from agent.web import metrics
from agent.web.server import WebConfigError, WebServer
from tests.harness import make_config
from tests.web import http_get


class FakeAgent:
    """Only a snapshot: the server under test is real, the agent behind it is a table."""

    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap
        self.pipeline = None

    def snapshot(self) -> dict[str, Any]:
        return self.snap


SNAPSHOT: dict[str, Any] = {
    "agent": {"version": "1.2.3", "uptime_s": 12.5, "reloads_ok": 1, "reloads_rejected": 0},
    "sensors": [
        {"name": "env", "driver": "bme280", "state": "up", "readings": 10, "failures": 0,
         "restarts": 0},
        {"name": 'we"ird\\name\n', "driver": "pzem004t", "state": "down", "readings": 0,
         "failures": 7, "restarts": 2},
    ],
    "queues": {"readings": {"depth": 3, "dropped": 5}},
    "clean": {"env.temperature": {"good": 9, "suspect": 1, "bad": 0,
                                  "dropped": {"out_of_range": 2}, "stale": False}},
    "outbox": {"depth": {"window": 4, "raw": 0}, "bytes_by_class": {"window": 4096},
               "drops": {"raw": 11}, "oldest_age_s": 3.25, "quarantine_rows": 1,
               "commit_errors": 0},
    "uplink": {"state": "connected", "puback_latency_ms": 2.5, "reconnects": 3,
               "connect_failures": 1, "published": 40, "acked": 39, "quarantined": 1,
               "inflight": 1},
    "models": {"status": {"models": {"energy": {
        "last_latency_ms": 0.4, "runs": 5, "failures": 0,
        "guard": {"skill": -0.25, "source": "fallback"}}}}},
}


def samples(families: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples}


@pytest.mark.parametrize("openmetrics", [False, True])
def test_exposition_parses_with_prometheus_client(openmetrics: bool) -> None:
    text = metrics.render(metrics.families(SNAPSHOT), openmetrics=openmetrics).decode()
    fams = list((parse_openmetrics if openmetrics else parse_prometheus)(text))
    types = {f.name: f.type for f in fams}
    got = samples(fams)
    assert types["edge_agent_sensor_readings"] == "counter"
    assert types["edge_agent_outbox_rows"] == "gauge"
    assert got[("edge_agent_sensor_up", (("driver", "bme280"), ("sensor", "env")))] == 1
    weird = 'we"ird\\name\n'
    assert got[("edge_agent_sensor_up", (("driver", "pzem004t"), ("sensor", weird)))] == 0
    assert got[("edge_agent_sensor_errors_total", (("sensor", weird),))] == 7
    assert got[("edge_agent_outbox_rows", (("class", "window"),))] == 4
    assert got[("edge_agent_outbox_dropped_total", (("class", "raw"),))] == 11
    assert got[("edge_agent_outbox_oldest_age_seconds", ())] == 3.25
    assert got[("edge_agent_uplink_puback_latency_seconds", ())] == 0.0025
    assert got[("edge_agent_uplink_state", (("state", "connected"),))] == 1
    assert got[("edge_agent_uplink_state", (("state", "waiting"),))] == 0
    assert got[("edge_agent_model_fallback", (("model", "energy"),))] == 1
    assert got[("edge_agent_model_skill", (("model", "energy"),))] == -0.25
    assert got[("edge_agent_readings_quality_total",
                (("channel", "env.temperature"), ("quality", "suspect")))] == 1
    assert got[("edge_agent_build_info", (("python", __import__("platform").python_version()),
                                          ("version", "1.2.3")))] == 1


def test_naming_conventions() -> None:
    for fam in metrics.families(SNAPSHOT):
        assert fam.name.startswith("edge_agent_")
        assert fam.name.endswith("_total") == (fam.kind == "counter"), fam.name
        for word in ("_ms", "_milliseconds", "_kb"):
            assert word not in fam.name, fam.name


def test_a_snapshot_with_holes_and_nonsense_still_renders() -> None:
    snap = {"sensors": [{"name": "x", "state": None, "readings": math.nan,
                         "failures": math.inf, "restarts": "many"}],
            "clean": {"x.y": "not a mapping"}, "outbox": {"depth": {"window": None}},
            "uplink": {"puback_latency_ms": None}, "models": {}}
    text = metrics.render(metrics.families(snap), openmetrics=True).decode()
    got = samples(parse_openmetrics(text))
    assert got[("edge_agent_sensor_up", (("driver", ""), ("sensor", "x")))] == 0
    assert not any(k[0] == "edge_agent_sensor_readings_total" for k in got)
    assert not any(k[0] == "edge_agent_uplink_puback_latency_seconds" for k in got)


async def serve(cfg: WebConfig, snap: dict[str, Any] | None = None) -> tuple[WebServer, Any]:
    web = WebServer(cfg, FakeAgent(snap or SNAPSHOT))
    await web.start()
    return web, asyncio.create_task(web.serve())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_metrics_alone_serves_no_page() -> None:
    web, task = await serve(WebConfig(metrics=True, port=0))
    try:
        status, headers, body = await http_get(web.port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b"edge_agent_sensor_up" in body
        status, headers, body = await http_get(
            web.port, "/metrics", {"Accept": "application/openmetrics-text;version=1.0.0"})
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        for path in ("/", "/events", "/api/status", "/static/app.js"):
            assert (await http_get(web.port, path))[0] == 404, path
    finally:
        await stop(task)


async def test_page_alone_serves_no_metrics_and_its_assets() -> None:
    web, task = await serve(WebConfig(page=True, port=0))
    try:
        assert (await http_get(web.port, "/metrics"))[0] == 404
        status, headers, body = await http_get(web.port, "/")
        assert status == 200 and b"/static/app.js" in body
        assert "default-src 'self'" in headers["content-security-policy"]
        for name in ("app.js", "style.css", "icon.svg"):
            status, _, body = await http_get(web.port, f"/static/{name}")
            assert status == 200 and body, name
            assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b""), name
            assert b"https://" not in body, name
        for path in ("/static/../server.py", "/static/%2e%2e/http.py", "/static/__init__.py",
                     "/static/", "/static/.hidden.js", "/nope"):
            assert (await http_get(web.port, path))[0] == 404, path
        status, _, body = await http_get(web.port, "/api/status")
        assert status == 200 and json.loads(body)["summary"]["sensors"][0]["name"] == "env"
    finally:
        await stop(task)


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET nothing HTTP/1.1\r\n\r\n",
    b"GET / SPDY/9\r\n\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-\xff\xfe: v\r\n\r\n",
    b"\xff\xfe\xfd / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x",  # truncated: the client closes mid-head
])
async def test_hostile_requests_get_400_and_the_server_goes_on(raw: bytes) -> None:
    web, task = await serve(WebConfig(page=True, metrics=True, port=0))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
        writer.write(raw)
        if raw.endswith(b"x"):
            writer.write_eof()
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert (await http_get(web.port, "/metrics"))[0] == 200
        assert web.http.bad_requests == 1
    finally:
        await stop(task)


async def test_writes_are_refused_and_clients_are_bounded() -> None:
    web, task = await serve(WebConfig(page=True, metrics=True, port=0, max_clients=2))
    try:
        raw = b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        status, headers, _ = await http_get(web.port, "", raw=raw)
        assert status == 405 and headers["allow"] == "GET, HEAD"
        idle = [await asyncio.open_connection("127.0.0.1", web.port) for _ in range(2)]
        status, _, _ = await http_get(web.port, "/metrics")
        assert status == 503 and web.http.refused == 1
        for _, w in idle:
            w.close()
    finally:
        await stop(task)


async def test_events_stream_status_then_ends_with_the_server() -> None:
    web, task = await serve(WebConfig(page=True, port=0))
    reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
    writer.write(b"GET /events HTTP/1.1\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b"text/event-stream" in head
    first = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    assert first.startswith(b"retry:")
    status = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    assert status.startswith(b"event: status\ndata: ")
    assert json.loads(status.split(b"data: ", 1)[1])["uplink"]["state"] == "connected"
    assert web.watchers == 1
    await stop(task)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
    assert web.watchers == 0
    writer.close()


def test_token_rules(tmp_path: Path) -> None:
    base = make_config(tmp_path, 1883)
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "web": {"page": True, "bind": "0.0.0.0"}})
    assert "web" in str(err.value.problems) and "token_file" in str(err.value.problems)
    # Off, a non-loopback address is harmless; on loopback, no token is needed.
    parse_config({**base, "web": {"bind": "0.0.0.0"}})
    parse_config({**base, "web": {"page": True}})
    with pytest.raises(ConfigError):
        parse_config({**base, "web": {"port": 70000}})
    for content, why in ((None, "no such file"), ("short\n", "at least 16"),
                         ("\n\n", "at least 16"), (b"\xff\xfe" * 20, "unreadable")):
        path = tmp_path / "token"
        path.unlink(missing_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(WebConfigError, match=why) as e:
            WebServer(WebConfig(page=True, bind="0.0.0.0", token_file=str(path)), FakeAgent({}))
        assert "web.token_file" in str(e.value)


async def test_token_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = "t0ken-that-must-not-leak-42"
    (tmp_path / "token").write_text(token)
    caplog.set_level("DEBUG")
    web, task = await serve(WebConfig(page=True, metrics=True, port=0,
                                      token_file=str(tmp_path / "token")))
    try:
        for auth in (f"Bearer {token}", "Bearer nope", "Basic !!!", f"Basic {token}"):
            await http_get(web.port, "/metrics", {"Authorization": auth})
        await http_get(web.port, "", raw=f"GET /?token={token} HTTP/9\r\n\r\n".encode())
    finally:
        await stop(task)
    assert web.http.unauthorized == 3
    assert token not in caplog.text


async def test_live_events_follow_a_reload(tmp_path: Path) -> None:
    from tests.broker import free_port
    from tests.harness import running_agent, write_toml
    from tests.waiting import until
    from tests.web import page_config

    data = page_config(tmp_path, free_port())
    path = write_toml(tmp_path / "agent.toml", data)
    async with running_agent(data, config_path=path) as agent:
        assert agent.web is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.web.port)
        writer.write(b"GET /events HTTP/1.1\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)

        async def next_update() -> dict[str, Any]:
            while True:
                event = await asyncio.wait_for(reader.readuntil(b"\n\n"), 15)
                if event.startswith(b"event: update"):
                    body: dict[str, Any] = json.loads(event.split(b"data: ", 1)[1])
                    if "readings" in body:
                        return body

        sensors = {"env", "lights", "air"}
        assert {ch.split(".")[0] for ch in (await next_update())["readings"]} <= sensors
        first = agent.pipeline
        agent.request_reload()
        await until(lambda: agent.generation == 2 and agent.pipeline is not first, 20,
                    "the new generation")
        # Readings of the new pipeline reach the same open stream.
        assert agent.pipeline is not None
        new_tail = agent.pipeline.tail
        await until(lambda: new_tail.active, 20, "the stream to follow the new pipeline")
        assert {ch.split(".")[0] for ch in (await next_update())["readings"]} <= sensors
        assert first is not None and not first.tail.active  # nothing left subscribed to the old one
        writer.close()
