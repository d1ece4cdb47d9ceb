"""CPU per reading: 10 sensors at 10 Hz shared raw, this tree beside the tree before batches.

    python -m bench.cpu [--seconds 30] [--rounds 2] [--before REV] [--json]

Ten synthetic sensors, each polled at 10 Hz and giving 7 readings a poll (a PZEM-004T gives 7
quantities), in one stream with ``share = "raw"``: 700 readings/s offered, the load of ten
meters at 10 Hz. The agent runs as its own process on a local mosquitto; an independent QoS 1
subscriber counts the readings that reach it. CPU is the agent process's utime + stime over the
window (``/proc/PID/stat``). The baseline is the same config run by the tree at REV (default:
the parent of the commit that added the batched raw lane, ``agent/feed/raw_batch.py``),
extracted with ``git archive``; the two alternate ``--rounds`` times, so both see the same host.
The synthetic sensor itself changed too (one clock read per poll, not per reading): part of
the difference is the load generator, which runs inside the agent process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e import PREFIX, ReadingCounter  # noqa: E402
from bench.procs import GATEWAY, agent_config, agent_running, cpu_s, raw_share, synthetic  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402

SENSORS = 10
PERIOD_S = 0.1
PER_POLL = 7


def before_rev() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--",
                            "agent/feed/raw_batch.py"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    if not added:
        raise SystemExit("agent/feed/raw_batch.py is not committed yet: pass --before REV")
    return added[-1] + "~1"


def extract(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, check=True,
                             capture_output=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def config(d: Path, port: int) -> Path:
    d.mkdir(parents=True)
    sensors = [synthetic(f"m{i}", PERIOD_S, burst=PER_POLL) for i in range(SENSORS)]
    return agent_config(d, port, sensors=sensors,
                        streams=[{"name": "meters", "sensors": [s["name"] for s in sensors],
                                  **raw_share()}],
                        runtime={"health_period_s": 30, "clock": "trust"})


async def one(tree: Path, d: Path, port: int, seconds: float) -> dict[str, float]:
    """CPU % and CPU us per delivered reading of one agent run."""
    cfg = config(d, port)
    counter = ReadingCounter(port, f"{PREFIX}/{GATEWAY}/raw/#")
    task = asyncio.create_task(counter.run(), name="bench-counter")
    try:
        await asyncio.wait_for(counter.ready.wait(), 10)
        with agent_running(cfg, d / "agent.log", tree=tree) as a:
            await asyncio.sleep(3.0)  # past start-up work
            c0, n0, m0, t0 = cpu_s(a.pid), counter.readings, counter.messages, time.monotonic()
            await asyncio.sleep(seconds)
            c1, n1, m1, t1 = cpu_s(a.pid), counter.readings, counter.messages, time.monotonic()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    wall, readings = t1 - t0, n1 - n0
    return {"cpu_pct": 100 * (c1 - c0) / wall, "readings_per_s": readings / wall,
            "messages_per_s": (m1 - m0) / wall,
            "us_per_reading": 1e6 * (c1 - c0) / readings if readings else float("nan")}


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


async def measure(tmp: Path, port: int, seconds: float, rounds: int,
                  before: str | None = None) -> dict[str, Any]:
    rev = before or before_rev()
    old_tree = extract(rev, tmp / "before-tree")
    agent: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    for i in range(rounds):
        base.append(await one(old_tree, tmp / f"before-{i}", port, seconds))
        agent.append(await one(ROOT, tmp / f"after-{i}", port, seconds))
    return {"agent": _mean(agent), "baseline": _mean(base), "runs": {"agent": agent,
            "baseline": base}, "before": rev, "seconds": seconds,
            "offered_per_s": SENSORS * PER_POLL / PERIOD_S}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", default=None, help="the baseline revision")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as d:
        b = Mosquitto(Path(d) / "mosq")
        b.start()
        try:
            r = asyncio.run(measure(Path(d), b.port, args.seconds, args.rounds, args.before))
        finally:
            b.stop()
    a, base = r["agent"], r["baseline"]
    print(f"10 sensors at 10 Hz, {r['offered_per_s']:.0f} readings/s offered, "
          f"{args.rounds} x {args.seconds:.0f} s each; baseline {r['before']}")
    for name, m in (("this tree", a), ("before batches", base)):
        print(f"{name:15s} CPU {m['cpu_pct']:5.2f} %  {m['us_per_reading']:6.1f} us/reading  "
              f"delivered {m['readings_per_s']:6.1f} readings/s in "
              f"{m['messages_per_s']:6.1f} messages/s")
    print(f"ratio (CPU per reading, this tree / before): "
          f"{a['us_per_reading'] / base['us_per_reading']:.2f}")
    if args.json:
        print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
