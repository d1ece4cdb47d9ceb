"""A load generator that drives the real Outbox and Uplink, for crash tests and benchmarks.

    python -m agent.uplink.loadgen --host 127.0.0.1 --port 1883 --db /tmp/o.db --rate 2000

It puts window messages on ``telemetry/s0..`` at ``--rate`` per second and prints, flushed,
one line per event so a supervising process can follow it::

    open <next_seq> <boot_id>     the outbox is open; the first seq this run will use
    accepted <seq>                at a commit: every seq up to <seq> is accepted
    drained                       with --count: all produced and acknowledged (then exits 0)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence

from agent.config.schema import MqttConfig, OutboxConfig
from agent.feed.messages import window_message
from agent.outbox.store import Outbox, Row
from agent.readings import ChannelStats, Window
from agent.uplink.forwarder import Uplink

TICK_S = 0.01


def _window(stream: str, i: int) -> Window:
    start = time.time_ns() // 1_000_000_000 * 1_000_000_000
    stats = ChannelStats(count=10, mean=20.0 + i % 7, min=19.0, max=22.0, last=21.0, std=0.4,
                         unit="degC")
    return Window(stream, start, start + 10_000_000_000, {"bme.temperature": stats})


async def run(args: argparse.Namespace) -> int:
    gateway = args.gateway
    outbox = Outbox(OutboxConfig(path=args.db, commit_interval_ms=args.commit_interval_ms,
                                 commit_batch=args.commit_batch), gateway)
    outbox.open()
    print(f"open {outbox.next_seq} {outbox.boot_id}", flush=True)

    def on_commit(rows: Sequence[Row]) -> None:
        if rows:
            print(f"accepted {outbox.accepted_seq}", flush=True)

    outbox.add_listener(on_commit)
    mqtt = MqttConfig(host=args.host, port=args.port, max_inflight=args.max_inflight,
                      reconnect_max_s=args.reconnect_max_s, replay_rate=args.replay_rate)
    uplink = Uplink(mqtt, gateway, outbox)
    drained = False
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(outbox.run(), name="outbox"),
                     tg.create_task(uplink.run(), name="uplink")]
            produced = 0
            t0 = time.monotonic()
            while args.count is None or produced < args.count:
                due = int((time.monotonic() - t0) * args.rate) + 1
                if args.count is not None:
                    due = min(due, args.count)
                while produced < due:
                    stream = f"s{produced % args.streams}"
                    outbox.put("window", f"telemetry/{stream}", window_message(
                        gateway, _window(stream, produced)))
                    produced += 1
                await asyncio.sleep(TICK_S)
            outbox.flush()
            drained = await uplink.drain(args.drain_timeout_s)
            outbox.flush()
            if drained:
                print("drained", flush=True)
            for t in tasks:
                t.cancel()
    finally:
        outbox.close()
    return 0 if drained else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.uplink.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--db", required=True, help="outbox database path")
    p.add_argument("--gateway", default="gw-load")
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    p.add_argument("--count", type=int, default=None, help="stop after this many, then drain")
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--commit-interval-ms", type=int, default=50)
    p.add_argument("--commit-batch", type=int, default=500)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--replay-rate", type=float, default=5000.0)
    p.add_argument("--reconnect-max-s", type=float, default=1.0)
    p.add_argument("--drain-timeout-s", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.streams < 1:
        p.error("--rate must be > 0 and --streams >= 1")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
