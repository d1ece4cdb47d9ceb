"""A fleet that lost the same broker comes back spread over ``reconnect_spread_s``."""

from __future__ import annotations

import random
import time
from pathlib import Path

from agent.config.schema import MqttConfig, OutboxConfig
from agent.feed.messages import health_message
from agent.outbox.store import Outbox
from agent.uplink.forwarder import STABLE_S, Uplink
from tests.test_uplink import GW, broker_at, running
from tests.waiting import until


class Ceiling(random.Random):
    """Draws the top of every range: the longest spread, probe interval and backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_reconnect_after_a_lost_link_waits_its_spread_and_loses_nothing(
        tmp_path: Path) -> None:
    b = broker_at(tmp_path / "mosq")
    try:
        ob = Outbox(OutboxConfig(path=str(tmp_path / "outbox.db"), commit_interval_ms=20), GW)
        ob.open()
        up = Uplink(MqttConfig(host=b.host, port=b.port, reconnect_spread_s=1.5), GW, ob,
                    rng=Ceiling())
        async with running(ob, up):
            await until(lambda: (up.status()["connected_for_s"] or 0) >= STABLE_S, 20,
                        "a connection that held")
            b.stop()
            await until(lambda: up.status()["state"] != "connected", 20, "the link lost")
            during = [ob.put("health", "health", health_message(GW, {"i": i}))
                      for i in range(5)]
            b.start()
            reopened = time.monotonic()
            # The port is open again, and the connect waits for its share of the spread.
            await until(lambda: up.status()["state"] == "waiting", 10, "the spread wait")
            await until(lambda: up.status()["state"] == "connected", 20, "the reconnect")
            waited = time.monotonic() - reopened
            assert await up.drain(20)
            st = up.status()
        ob.close()
    finally:
        b.stop()
    assert waited >= 1.5  # the sleep's lower bound, never a wall-clock ceiling
    assert st["reconnects"] == 1
    assert st["acked"] >= len(during)


def test_spread_is_bounded_and_may_be_switched_off() -> None:
    assert MqttConfig().reconnect_spread_s == 5.0
    assert MqttConfig(reconnect_spread_s=0).reconnect_spread_s == 0
    for bad in (-1, 601, float("nan"), float("inf")):
        try:
            MqttConfig(reconnect_spread_s=bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
