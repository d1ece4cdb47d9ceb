"""A real Prometheus scrapes the agent's /metrics on loopback; its HTTP API answers for the
sensor-up series and the outbox depth."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.broker import free_port
from tests.harness import running_agent
from tests.prometheus import prometheus, query
from tests.web import page_config

pytestmark = pytest.mark.slow


async def until_query(base: str, promql: str, ok: object, timeout_s: float = 30.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await asyncio.to_thread(query, base, promql)
        if ok(result):  # type: ignore[operator]
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{promql}: {result}")
        await asyncio.sleep(0.5)


async def test_prometheus_scrapes_sensor_up_and_outbox_depth(tmp_path: Path) -> None:
    # No broker on this port: the outbox fills, so its depth is a number that must grow.
    cfg = page_config(tmp_path, free_port(), page=False)
    async with running_agent(cfg) as agent:
        assert agent.web is not None
        with prometheus(tmp_path / "prom", [f"127.0.0.1:{agent.web.port}"]) as base:
            up = await until_query(base, 'edge_agent_sensor_up{sensor="env"}',
                                   lambda r: bool(r) and r[0]["value"][1] == "1")
            assert up[0]["metric"]["driver"] == "bme280"
            assert up[0]["metric"]["job"] == "edge-agent"
            sensors = await until_query(base, "edge_agent_sensor_up",
                                        lambda r: len(r) == 3)
            assert {s["metric"]["sensor"] for s in sensors} == {"env", "lights", "air"}
            depth = await until_query(base, "sum(edge_agent_outbox_rows)",
                                      lambda r: bool(r) and float(r[0]["value"][1]) > 0)
            stored = agent.snapshot()["outbox"]["rows"]
            assert 0 < float(depth[0]["value"][1]) <= stored
            targets = await until_query(base, 'up{job="edge-agent"}',
                                        lambda r: bool(r) and r[0]["value"][1] == "1")
            assert targets
            # The counter kept its type through the scrape: rate() of it is defined.
            await until_query(base, 'rate(edge_agent_sensor_readings_total{sensor="lights"}[5s])',
                              lambda r: bool(r) and float(r[0]["value"][1]) > 0)
