"""Every benchmark figure beside a raw baseline measured in the same run, with the ratio.

    python -m bench.run [--quick] [--json] [--out bench/results/latest.json]

Starts its own mosquitto on a free loopback port. The agent runs as its own process for the
whole-agent figures (throughput, latency, idle CPU, RSS, time to READY, outage replay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import cpu, e2e, micro, replay  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal:"))
    try:
        mosq = subprocess.run([Mosquitto(Path(tempfile.gettempdir())).exe, "-h"],
                              check=False, capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired, RuntimeError):
        mosq = "unknown"
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "mosquitto": mosq, "onnxruntime": onnxruntime.__version__}


async def measure(quick: bool) -> dict[str, Any]:
    secs = 5.0 if quick else 10.0
    out: dict[str, Any] = {"machine": machine(), "quick": quick,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out["outbox_commit"] = micro.outbox_vs_sqlite(20_000 if quick else 50_000, 3)
    out["clean_fuse"] = micro.clean_fuse_rate(100_000 if quick else 200_000, 3)
    out["inference"] = await micro.inference(5 if quick else 20)
    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        tmp = Path(d)
        b = Mosquitto(tmp / "mosq")
        b.start()
        try:
            out["throughput"] = await e2e.throughput(tmp, b.port, secs)
            # One message per reading, offered 20,000/s as the bench offered before batches.
            out["throughput_per_reading"] = await e2e.throughput(tmp, b.port, secs, "reading",
                                                                 burst=50)
            out["latency"] = await e2e.latency(tmp, b.port, 200, secs, 50)
            out["latency_default_commit"] = await e2e.latency(tmp, b.port, 500, secs)
            out.update(await e2e.rss_and_ready(tmp, b.port, 3))
            out["idle_cpu"] = await e2e.idle_cpu(tmp, b.port, 30.0 if quick else 60.0)
            try:
                out["cpu_per_reading"] = await cpu.measure(tmp / "cpu", b.port,
                                                           15.0 if quick else 30.0,
                                                           1 if quick else 2)
            except (SystemExit, subprocess.CalledProcessError) as exc:  # no git history
                out["cpu_per_reading"] = {"skipped": str(exc)}
            out.update(await replay.replay(tmp, b.port))
        finally:
            b.stop()
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def table(r: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str, str, str]] = []

    def add(what: str, a: float, b: float, fmt: str, unit: str) -> None:
        rows.append((what, f"{a:{fmt}} {unit}", f"{b:{fmt}} {unit}", _ratio(a, b)))

    t = r["throughput"]
    add("raw readings -> PUBACK (batches) vs bare QoS 1 msg/s", t["agent"], t["baseline"],
        ",.0f", "/s")
    t = r.get("throughput_per_reading", t)
    add("raw readings -> PUBACK ([raw] format = reading)", t["agent"], t["baseline"], ",.0f",
        "/s")
    add("clean + fuse (one core)", r["clean_fuse"]["agent"], r["clean_fuse"]["baseline"],
        ",.0f", "/s")
    for name, m in r["inference"].items():
        for p in ("p50", "p99"):
            add(f"inference {name} {p}", m["agent"][p] * 1000, m["baseline"][p] * 1000,
                ",.1f", "us")
    add("outbox commit (batch 500)", r["outbox_commit"]["agent"],
        r["outbox_commit"]["baseline"], ",.0f", "/s")
    for key, label in (("latency", "commit 50 ms"), ("latency_default_commit",
                                                     "default config")):
        lat = r[key]
        for p in ("p50", "p99"):
            add(f"latency Reading.ts -> subscriber {p} @{lat['rate']}/s, {label}",
                lat["agent"][p], lat["baseline"][p], ",.1f", "ms")
    add("idle CPU, 10 sensors at 1 Hz", r["idle_cpu"]["agent"], r["idle_cpu"]["baseline"],
        ".2f", "%")
    c = r.get("cpu_per_reading", {})
    if "agent" in c:
        add("CPU per reading, 10 sensors x 10 Hz raw, vs before batches",
            c["agent"]["us_per_reading"], c["baseline"]["us_per_reading"], ".1f", "us")
        add("  same, CPU % of one core", c["agent"]["cpu_pct"], c["baseline"]["cpu_pct"], ".2f",
            "%")
    add("RSS after READY, both models", r["rss"]["agent"], r["rss"]["baseline"], ".1f", "MiB")
    add("time to READY", r["ready"]["agent"], r["ready"]["baseline"], ".2f", "s")
    dr = r["drain"]
    add(f"drain 1 h backlog ({dr['messages']} msgs) vs n/replay_rate", dr["agent"],
        dr["baseline"], ".1f", "s")
    ll = r["live_latency"]
    for p in ("p50", "p99"):
        add(f"live latency {p} during drain vs after", ll["agent"][p], ll["baseline"][p],
            ",.1f", "ms")
    head = ("figure", "agent", "baseline", "ratio")
    widths = [max(len(x[i]) for x in [*rows, head]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join((row[0].ljust(widths[0]), *(c.rjust(w) for c, w in
                                                            zip(row[1:], widths[1:],
                                                                strict=True)))))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (about 3 minutes)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(measure(args.quick))
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, Linux {m['kernel']}, "
          f"Python {m['python']}, {m['mosquitto']}")
    for line in table(results):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"saved {args.out}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
