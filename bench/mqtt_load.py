"""A bare aiomqtt QoS 1 publisher, the baseline for the agent's uplink figures.

    python -m bench.mqtt_load --port P [--rate R] [--seconds S] [--inflight N] [--size B]

Publishes JSON ``{"t": <wall ns at publish>, "i": n, "pad": ...}`` of about ``--size`` bytes on
``bench/bare``: as fast as PUBACKs allow (``--rate 0``) or paced at ``--rate`` per second.
Prints one line ``published <n> <seconds>`` when done (all PUBACKs in).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiomqtt

TOPIC = "bench/bare"


def payload(i: int, size: int) -> bytes:
    doc = {"t": time.time_ns(), "i": i, "pad": ""}
    pad = max(0, size - len(json.dumps(doc)))
    doc["pad"] = "p" * pad
    return json.dumps(doc).encode()


async def publish(host: str, port: int, rate: float, seconds: float, inflight: int,
                  size: int) -> tuple[int, float]:
    async with aiomqtt.Client(host, port, identifier=f"bench-bare-{time.monotonic_ns()}",
                              max_inflight_messages=inflight, timeout=10) as c:
        c.pending_calls_threshold = inflight + 10
        sem = asyncio.Semaphore(inflight)
        n = 0

        async def one(i: int) -> None:
            try:
                await c.publish(TOPIC, payload(i, size), qos=1, timeout=10)
            finally:
                sem.release()

        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            while (now := time.monotonic() - t0) < seconds:
                if rate > 0:
                    due = int(now * rate) + 1
                    if n >= due:
                        await asyncio.sleep(max(0.0, (n / rate) - now))
                        continue
                await sem.acquire()
                tg.create_task(one(n), name=f"publish-{n}")
                n += 1
        return n, time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--size", type=int, default=330)
    a = p.parse_args()
    n, elapsed = asyncio.run(publish(a.host, a.port, a.rate, a.seconds, a.inflight, a.size))
    print(f"published {n} {elapsed:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
