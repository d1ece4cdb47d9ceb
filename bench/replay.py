"""Outage replay: drain an hour of backlog at the configured replay rate, with live data on top.

The backlog is an hour of a gateway shaped like the demo (three streams of 5 s and 10 s windows,
two models, health every 10 s), written through the Outbox API into the file the agent then
opens. The agent also runs a live raw stream; its latency is measured while the backlog drains
and for as long again after it has drained, in the same process.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from agent.config.schema import MqttConfig, OutboxConfig
from agent.feed.messages import window_message
from agent.outbox.store import Outbox
from agent.readings import ChannelStats, Window
from bench.e2e import PREFIX, Feed, pcts, raw_readings
from bench.procs import GATEWAY, agent_config, agent_running, raw_share, synthetic

# Messages per hour of the demo gateway: windows 720 + 360 + 360, inferences 720 + 360,
# health 360.
HOUR: dict[str, int] = {"traffic": 720, "energy": 360, "environment": 360,
                        "inference-traffic": 720, "inference-energy": 360, "health": 360}
LIVE_RATE = 20  # raw readings/s published live during the drain


def _window(stream: str, start_ns: int, channels: int) -> Window:
    stats = {f"dev{i}.q{i}": ChannelStats(count=10, mean=20.0 + i, min=19.0, max=22.0,
                                          last=21.0, std=0.4, unit="degC")
             for i in range(channels)}
    return Window(stream, start_ns, start_ns + 10_000_000_000, stats)


def fill(path: Path) -> tuple[int, int]:
    """Write one hour of backlog into the outbox at ``path``; return its first and last seq."""
    ob = Outbox(OutboxConfig(path=str(path)), GATEWAY)
    ob.open()
    t0 = (time.time_ns() - 3600 * 10**9) // 10**10 * 10**10
    total = sum(HOUR.values())
    # In time order, as the live feed would have put them.
    kinds = sorted((j / n, k) for k, n in HOUR.items() for j in range(n))
    for i, (_frac, k) in enumerate(kinds):
        stream = k.removeprefix("inference-")
        ob.put("window", f"telemetry/{stream}",
               window_message(GATEWAY, _window(stream, t0 + i * 3600 * 10**9 // total, 6)))
        if i % 500 == 499:
            ob.flush()
    ob.flush()
    first, last = ob.accepted_seq - total + 1, ob.accepted_seq
    ob.close()
    return first, last


async def replay(tmp: Path, port: int) -> dict[str, Any]:
    d = tmp / "replay"
    d.mkdir()
    outbox_path = d / "outbox.db"
    first, last = await asyncio.to_thread(fill, outbox_path)
    count = last - first + 1
    rate = MqttConfig().replay_rate
    sensors = [synthetic(f"s{i}", 2 / LIVE_RATE) for i in range(2)]
    cfg = agent_config(d, port, sensors=sensors,
                       streams=[{"name": "live", "sensors": ["s0", "s1"], **raw_share()}],
                       outbox={"path": str(outbox_path), "commit_interval_ms": 50})
    feed = Feed(port, f"{PREFIX}/{GATEWAY}/#")
    task = asyncio.create_task(feed.run(), name="replay-feed")
    try:
        await asyncio.wait_for(feed.ready.wait(), 10)
        with agent_running(cfg, d / "agent.log"):
            t_ready = time.time_ns()
            seen: set[int] = set()
            idx = 0
            deadline = time.monotonic() + 10 * count / rate + 60
            while len(seen) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"backlog not drained: {len(seen)}/{count}")
                for _recv, body in feed.got[idx:]:
                    if first <= body.get("seq", 0) <= last:
                        seen.add(body["seq"])
                idx = len(feed.got)
                await asyncio.sleep(0.05)
            t_drained = time.time_ns()
            drain_s = (t_drained - t_ready) / 1e9
            await asyncio.sleep(max(5.0, min(drain_s, 20.0)))
            got = list(feed.got)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    during: list[float] = []
    after: list[float] = []
    for recv, body in got:
        for r in raw_readings(body):
            ms = (recv - r["sampled_ns"]) / 1e6
            (during if recv <= t_drained else after).append(ms)
    return {"drain": {"agent": drain_s, "baseline": count / rate, "unit": "s",
                      "messages": count, "replay_rate": rate},
            "live_latency": {"agent": pcts(during), "baseline": pcts(after), "unit": "ms",
                             "live_rate": LIVE_RATE}}
