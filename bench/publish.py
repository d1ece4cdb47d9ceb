"""Publish rate: outbox -> PUBACK through the real Outbox and Uplink, beside bare aiomqtt.

    python bench/publish.py [--count 20000] [--inflight 100] [--broker HOST:PORT]

Runs against one mosquitto (started here unless --broker is given), in one process, so the
figures are comparable. Rows printed:

  bare aiomqtt, 1 in flight      await client.publish(qos=1) in a loop
  bare aiomqtt, N in flight      N concurrent client.publish(qos=1) calls
  outbox live                    put() as fast as the producer can, until the last PUBACK
                                 (SQLite commit of each batch included, deletes committed)
  outbox backlog replay          rows already committed, replayed after connecting
                                 (replay_rate set high, so this is the lane's ceiling)

plus the largest event-loop stall seen while the outbox ran (the SQLite work is on a thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402

from agent.config.schema import MqttConfig, OutboxConfig  # noqa: E402
from agent.feed.messages import Draft, HealthMessage, encode, health_message  # noqa: E402
from agent.outbox.store import Outbox  # noqa: E402
from agent.uplink.forwarder import Uplink  # noqa: E402

PAYLOAD_BYTES = 200
COMMIT_BATCH = 1000
GW = "bench-gw"


@contextlib.asynccontextmanager
async def broker(arg: str | None) -> AsyncIterator[tuple[str, int]]:
    if arg:
        host, _, port = arg.rpartition(":")
        yield host, int(port)
        return
    from tests.broker import Mosquitto

    with tempfile.TemporaryDirectory() as d:
        b = Mosquitto(Path(d) / "mosq")
        b.start()
        try:
            yield b.host, b.port
        finally:
            b.stop()


class LoopLag:
    """The largest delay of a 5 ms timer: how long the event loop was blocked."""

    def __init__(self) -> None:
        self.max_ms = 0.0

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.max_ms = max(self.max_ms, (time.perf_counter() - t - 0.005) * 1000)


async def bare(host: str, port: int, count: int, inflight: int) -> tuple[float, LoopLag]:
    payload = b"x" * PAYLOAD_BYTES
    lag = LoopLag()
    async with aiomqtt.Client(host, port, identifier=f"bench-bare-{inflight}",
                              max_inflight_messages=max(20, inflight)) as c, \
            asyncio.TaskGroup() as outer:
        lag_task = outer.create_task(lag.run(), name="lag")
        c.pending_calls_threshold = inflight + 10
        t0 = time.perf_counter()
        if inflight == 1:
            for _ in range(count):
                await c.publish("bench/bare", payload, qos=1)
        else:
            sem = asyncio.Semaphore(inflight)

            async def one() -> None:
                async with sem:
                    await c.publish("bench/bare", payload, qos=1)

            async with asyncio.TaskGroup() as tg:
                for i in range(count):
                    tg.create_task(one(), name=f"publish-{i}")
        rate = count / (time.perf_counter() - t0)
        lag_task.cancel()
    return rate, lag


def _draft(i: int) -> Draft[HealthMessage]:
    return health_message(GW, {"i": i, "pad": "p" * 40})


async def through_outbox(host: str, port: int, count: int, inflight: int,
                         backlog: bool) -> tuple[float, dict[str, Any], LoopLag, float]:
    with tempfile.TemporaryDirectory() as d:
        ob = Outbox(OutboxConfig(path=f"{d}/outbox.db", commit_interval_ms=50,
                                 commit_batch=COMMIT_BATCH), GW)
        ob.open()
        up = Uplink(MqttConfig(host=host, port=port, max_inflight=inflight,
                               replay_rate=1e6), GW, ob)
        lag = LoopLag()
        if backlog:
            for i in range(count):
                ob.put("health", "health", _draft(i))
                if i % COMMIT_BATCH == COMMIT_BATCH - 1:
                    ob.flush()
            ob.flush()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(ob.run(), name="outbox"),
                     tg.create_task(lag.run(), name="lag")]
            t0 = time.perf_counter()
            tasks.append(tg.create_task(up.run(), name="uplink"))
            if not backlog:
                # An empty outbox is "drained" as soon as the uplink is connected.
                if not await up.drain(10):
                    raise RuntimeError(f"no connection: {up.status()}")
                committed = asyncio.Event()
                ob.add_listener(lambda rows: committed.set())
                t0 = time.perf_counter()
                for i in range(count):
                    ob.put("health", "health", _draft(i))
                    # A real producer is paced by its sensors; this one yields every 100
                    # messages and stays at most two commit batches ahead of the disk.
                    if i % 100 == 99:
                        await asyncio.sleep(0)
                    while ob.next_seq - 1 - ob.accepted_seq > 2 * COMMIT_BATCH:
                        committed.clear()
                        await committed.wait()
            ob.flush()
            ok = await up.drain(120)
            elapsed = time.perf_counter() - t0
            ob.flush()
            rows = await ob.fetch(0, 2**62, 1)
            st = up.status()
            for t in tasks:
                t.cancel()
        if not ok or st["acked"] < count or rows:
            raise RuntimeError(f"did not drain: {st}")
        max_commit_ms = ob.stats()["max_commit_ms"]
        ob.close()
        return count / elapsed, st, lag, max_commit_ms


async def main_async(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    async with broker(args.broker) as (host, port):
        one, one_lag = await bare(host, port, min(args.count, 5000), 1)
        many, many_lag = await bare(host, port, args.count, args.inflight)
        live, live_st, live_lag, commit_ms = await through_outbox(
            host, port, args.count, args.inflight, backlog=False)
        replay, replay_st, replay_lag, _ = await through_outbox(
            host, port, args.count, args.inflight, backlog=True)
    sample = len(_payload_example())
    print(f"messages: {args.count} QoS 1; bare payload {PAYLOAD_BYTES} B, feed message "
          f"{sample} B; broker {host}:{port}")
    print(f"bare aiomqtt, 1 in flight          {one:9.0f} msg/s   "
          f"(max loop stall {one_lag.max_ms:.1f} ms)")
    print(f"bare aiomqtt, {args.inflight:<3d} in flight        {many:9.0f} msg/s   "
          f"(max loop stall {many_lag.max_ms:.1f} ms)")
    print(f"outbox live -> PUBACK ({args.inflight} in flight) {live:9.0f} msg/s   "
          f"ratio to bare {live / many:.2f}  (replayed {live_st['replayed']}, "
          f"reconnects {live_st['reconnects']}, "
          f"max loop stall {live_lag.max_ms:.1f} ms, slowest commit {commit_ms:.1f} ms)")
    print(f"outbox backlog replay -> PUBACK    {replay:9.0f} msg/s   "
          f"ratio to bare {replay / many:.2f}  (replayed {replay_st['replayed']}, "
          f"max loop stall {replay_lag.max_ms:.1f} ms)")
    return 0


def _payload_example() -> bytes:
    return encode(health_message(GW, {"i": 12345, "pad": "p" * 40}).seal(
        seq=1_790_000_000_000, boot_id="0123456789ab", ts_ns=time.time_ns()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--inflight", type=int, default=100)
    p.add_argument("--broker", default=None, help="HOST:PORT of a running broker")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
