"""Whole-agent figures: the agent runs as its own process, as systemd runs it.

Each function returns ``{"agent": ..., "baseline": ..., ...}`` measured in the same call, so a
figure always stands beside its raw baseline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from agent.config.schema import OutboxConfig
from agent.control.client import ControlClient
from agent.feed.messages import SCHEMA_RAW_BATCH, SCHEMA_READING
from agent.feed.raw_batch import readings_of
from bench.procs import (
    GATEWAY,
    ROOT,
    AgentProcess,
    agent_config,
    agent_running,
    bare_startup_s,
    cpu_s,
    python_child,
    raw_share,
    rss_kib,
    synthetic,
)
from tests.harness import make_config, write_toml

PREFIX = "t"
READING_BYTES = 300  # a raw reading message as the agent encodes it
OFFER_BURST = 500  # readings per 10 ms of each of 4 synthetic sensors: 200,000 offered/s


class Feed:
    """Subscriber recording (receive wall ns, decoded body) of everything on a filter."""

    def __init__(self, port: int, topic: str) -> None:
        self.port = port
        self.topic = topic
        self.got: list[tuple[int, dict[str, Any]]] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port,
                                  identifier=f"bench-sub-{time.monotonic_ns()}") as c:
            c.pending_calls_threshold = 10_000
            await c.subscribe(self.topic, qos=1)
            self.ready.set()
            async for m in c.messages:
                now = time.time_ns()
                try:
                    body = json.loads(m.payload) if isinstance(m.payload, bytes) else None
                except ValueError:
                    continue  # the retained status is plain text
                if isinstance(body, dict):
                    self.got.append((now, body))


def iso_ns(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e6) * 1000


def raw_readings(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The readings of a raw message (either schema); none for any other message."""
    if body.get("schema") not in (SCHEMA_READING, SCHEMA_RAW_BATCH):
        return []
    return readings_of(body)


def pcts(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "n": len(ms)}


async def with_feed(port: int, topic: str, body: Callable[[Feed], Any]) -> Any:
    feed = Feed(port, topic)
    task = asyncio.create_task(feed.run(), name="bench-feed")
    try:
        await asyncio.wait_for(feed.ready.wait(), 10)
        return await body(feed)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def bare_publish(port: int, rate: float, seconds: float, inflight: int = 64) -> float:
    """Messages/s of the bare publisher child (all PUBACKs in)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.mqtt_load", "--port", str(port), "--rate", str(rate),
        "--seconds", str(seconds), "--inflight", str(inflight), "--size", str(READING_BYTES),
        cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    _, n, elapsed = out.decode().split()
    return int(n) / float(elapsed)


def _status(sock: Path) -> dict[str, Any]:
    with ControlClient(sock, timeout_s=5) as c:
        result: dict[str, Any] = c.call("status")
        return result


class ReadingCounter:
    """An independent subscriber counting the raw readings it receives (either schema)."""

    def __init__(self, port: int, topic: str) -> None:
        self.port = port
        self.topic = topic
        self.readings = 0
        self.messages = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port,
                                  identifier=f"bench-count-{time.monotonic_ns()}") as c:
            c.pending_calls_threshold = 10_000
            await c.subscribe(self.topic, qos=1)
            self.ready.set()
            async for m in c.messages:
                body = json.loads(m.payload) if isinstance(m.payload, bytes) else {}
                self.messages += 1
                self.readings += len(body.get("readings", ())) or 1


async def throughput(tmp: Path, port: int, seconds: float, fmt: str = "batch",
                     burst: int = OFFER_BURST) -> dict[str, Any]:
    """Raw readings/s from 4 synthetic sensors (``burst`` readings every 10 ms each) through
    the outbox to PUBACK, counted by an independent subscriber, vs bare aiomqtt QoS 1
    messages/s measured just before and just after it (the host is shared: the mean of the
    two is the baseline)."""
    d = tmp / f"throughput-{fmt}"
    d.mkdir()
    bare_before = await bare_publish(port, 0, seconds)
    sensors = [synthetic(f"s{i}", 0.01, burst=burst) for i in range(4)]
    cfg = agent_config(d, port, sensors=sensors,
                       streams=[{"name": "fast", "sensors": [s["name"] for s in sensors],
                                 **raw_share()}],
                       raw={"format": fmt})
    counter = ReadingCounter(port, f"{PREFIX}/{GATEWAY}/raw/#")
    task = asyncio.create_task(counter.run(), name="bench-counter")
    try:
        await asyncio.wait_for(counter.ready.wait(), 10)
        with agent_running(cfg, d / "agent.log"):
            sock = d / "control.sock"
            await asyncio.sleep(3.0)  # warm up: queues fill, the uplink reaches its pace
            s0 = await asyncio.to_thread(_status, sock)
            n0, m0, t0 = counter.readings, counter.messages, time.monotonic()
            await asyncio.sleep(seconds)
            n1, m1, t1 = counter.readings, counter.messages, time.monotonic()
            s1 = await asyncio.to_thread(_status, sock)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    bare_after = await bare_publish(port, 0, seconds)
    wall = t1 - t0
    return {"agent": (n1 - n0) / wall, "baseline": (bare_before + bare_after) / 2,
            "bare_before_after": [bare_before, bare_after], "unit": "readings/s vs msg/s",
            "format": fmt, "messages_per_s": (m1 - m0) / wall,
            "acked_per_s": (s1["uplink"]["acked"] - s0["uplink"]["acked"]) / wall,
            "offered": 4 * burst * 100, "readings_queue": s1["queues"]["readings"],
            "outbox_rows": s1["outbox"]["rows"]}


async def latency(tmp: Path, port: int, rate: int, seconds: float,
                  commit_interval_ms: int | None = None) -> dict[str, Any]:
    """Reading.ts -> subscriber receive at ``rate`` raw readings/s, vs bare publish->receive.

    ``commit_interval_ms`` None: the outbox and runtime at their defaults (only paths and the
    clock policy are set)."""
    d = tmp / f"latency-{rate}-{commit_interval_ms or 'default'}"
    d.mkdir()
    # Four sensors of rate/4 each, so the readings are spread over the period.
    period = 4 / rate
    sensors = [synthetic(f"s{i}", period) for i in range(4)]
    data = make_config(d, port, sensors=sensors,
                       streams=[{"name": "fast", "sensors": [s["name"] for s in sensors],
                                 **raw_share()}])
    data["gateway"] = {"id": GATEWAY}
    data["outbox"] = {"path": str(d / "outbox.db")}
    # Defaults but for the clock: this host's kernel clock is not NTP-synchronised, and under
    # "detect" readings are held as provisional; a synchronised gateway behaves as "trust".
    data["runtime"] = {"clock": "trust"}
    if commit_interval_ms is not None:
        data["outbox"]["commit_interval_ms"] = commit_interval_ms
    cfg = write_toml(d / "agent.toml", data)

    async def agent_run(feed: Feed) -> tuple[list[float], dict[str, Any]]:
        with agent_running(cfg, d / "agent.log"):
            await asyncio.sleep(1.0)
            start = len(feed.got)
            await asyncio.sleep(seconds)
            got = feed.got[start:]
            st = await asyncio.to_thread(_status, d / "control.sock")
        return [(recv - r["sampled_ns"]) / 1e6 for recv, b in got
                for r in raw_readings(b)], st["outbox"]

    agent_ms, outbox = await with_feed(port, f"{PREFIX}/{GATEWAY}/raw/#", agent_run)

    async def bare_run(feed: Feed) -> list[float]:
        await bare_publish(port, rate, seconds)
        await asyncio.sleep(0.5)
        return [(recv - b["t"]) / 1e6 for recv, b in feed.got]

    bare_ms = await with_feed(port, "bench/bare", bare_run)
    return {"agent": pcts(agent_ms), "baseline": pcts(bare_ms), "rate": rate,
            "commit_interval_ms": commit_interval_ms or OutboxConfig().commit_interval_ms,
            "unit": "ms", "outbox": {k: outbox.get(k) for k in (
                "commits", "published_through", "acked_before_commit", "rows")}}


IDLE_BASELINE = "import asyncio\nasyncio.run(asyncio.sleep(3600))"


async def idle_cpu(tmp: Path, port: int, seconds: float) -> dict[str, Any]:
    """CPU % of the agent with 10 synthetic sensors at 1 Hz, vs a sleeping asyncio loop."""
    d = tmp / "idle"
    d.mkdir()
    sensors = [synthetic(f"s{i}", 1.0) for i in range(10)]
    cfg = agent_config(d, port, sensors=sensors,
                       streams=[{"name": "cabinet", "sensors": [s["name"] for s in sensors]}],
                       runtime={"health_period_s": 30, "clock": "trust"})
    base = python_child(IDLE_BASELINE)
    try:
        with agent_running(cfg, d / "agent.log") as a:
            await asyncio.sleep(2.0)  # past start-up work
            a0, b0, t0 = cpu_s(a.pid), cpu_s(base.pid), time.monotonic()
            await asyncio.sleep(seconds)
            a1, b1, t1 = cpu_s(a.pid), cpu_s(base.pid), time.monotonic()
    finally:
        base.kill()
        base.wait(10)
    wall = t1 - t0
    return {"agent": 100 * (a1 - a0) / wall, "baseline": 100 * (b1 - b0) / wall,
            "seconds": round(wall, 1), "unit": "% of one core"}


def _models_config(d: Path, port: int) -> Path:
    traffic = [synthetic("radar", 1.0, quantity="speed", unit="m/s", base=12.0)]
    energy = [synthetic("meter", 1.0, quantity="active_power", unit="W", base=300.0)]
    return agent_config(
        d, port, sensors=traffic + energy,
        streams=[{"name": "traffic", "sensors": ["radar"], "window_s": 10},
                 {"name": "energy", "sensors": ["meter"], "window_s": 60}],
        models=[{"name": "traffic", "stream": "traffic"},
                {"name": "energy", "stream": "energy"}])


async def rss_and_ready(tmp: Path, port: int, starts: int) -> dict[str, Any]:
    """VmRSS after READY with both models loaded, and time to READY, vs bare processes."""
    d = tmp / "rss"
    d.mkdir()
    cfg = _models_config(d, port)
    rss, ready = [], []
    for i in range(starts):
        a = AgentProcess(cfg, d / f"agent-{i}.log")
        try:
            ready.append(a.wait_ready())
            rss.append(rss_kib(a.pid))
            status = await asyncio.to_thread(_status, d / "control.sock")
        finally:
            a.stop()
    loaded = sorted(status["models"]["status"]["models"])
    if loaded != ["energy", "traffic"]:
        raise RuntimeError(f"both models should be loaded, the agent has {loaded}")
    base = python_child("import time, onnxruntime, numpy\nprint('ok', flush=True)\n"
                        "time.sleep(60)")
    try:
        assert base.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(base.stdout.readline), 30)
        if line.strip() != b"ok":
            raise RuntimeError(f"baseline process said {line!r}")
        base_rss = rss_kib(base.pid)
    finally:
        base.kill()
        base.wait(10)
    bare_start = bare_startup_s()
    return {
        "rss": {"agent": float(np.median(rss)) / 1024, "baseline": base_rss / 1024,
                "unit": "MiB", "models": loaded},
        "ready": {"agent": float(np.median(ready)), "baseline": bare_start, "unit": "s",
                  "samples": [round(x, 3) for x in ready]},
    }


def main() -> int:
    """``python -m bench.e2e``: the latency figure at the default config, beside its baseline."""
    import argparse
    import tempfile

    from tests.broker import Mosquitto

    ap = argparse.ArgumentParser(description="end-to-end latency at the default config")
    ap.add_argument("--rate", type=int, default=500, help="raw readings per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--commit-interval-ms", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as d:
        b = Mosquitto(Path(d) / "mosq")
        b.start()
        try:
            r = asyncio.run(latency(Path(d), b.port, args.rate, args.seconds,
                                    args.commit_interval_ms))
        finally:
            b.stop()
    a, base = r["agent"], r["baseline"]
    print(f"Reading.ts -> subscriber at {r['rate']}/s, commit_interval_ms "
          f"{r['commit_interval_ms']}: {a['n']} messages; bare publish -> receive: "
          f"{base['n']} messages")
    for p in ("p50", "p99"):
        print(f"  {p}: agent {a[p]:.2f} ms, baseline {base[p]:.2f} ms, "
              f"ratio {a[p] / base[p]:.2f}")
    print(f"  outbox: {r['outbox']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
