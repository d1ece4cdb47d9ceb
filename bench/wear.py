"""Flash wear: bytes the agent sends to the block device per payload byte it accepts.

    python bench/wear.py [--seconds 60]

The agent runs the demo configuration (every device emulated, both models) with the outbox,
history and runtime settings at their defaults, against a real mosquitto on loopback, with its
state on the disk this runs on (not tmpfs) and its log to /dev/null, so the only writes are its
own state files. An independent QoS 1 subscriber sums the payload bytes of every feed message
(each ``msg_id`` once): the baseline. ``write_bytes`` from ``/proc/PID/io`` (bytes the process
caused to be written to the block device, counted when a page first turns dirty; a page
rewritten before it is written back counts once) is read just before SIGTERM.

Write amplification = write_bytes / payload bytes. ``cancelled_write_bytes`` (dirty pages
truncated before write-back, as a checkpointed WAL is) is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import NotifySocket  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402
from tests.harness import write_toml  # noqa: E402

DEMO = ROOT / "agent" / "examples" / "demo.toml"


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":")
        out[key] = int(value)
    return out


def state_files(tmp: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(tmp.glob("*.db*"))}


def config(tmp: Path, port: int) -> Path:
    data: dict[str, Any] = tomllib.loads(DEMO.read_text(encoding="utf-8"))
    data["mqtt"].update({"host": "127.0.0.1", "port": port})
    data["outbox"] = {"path": str(tmp / "outbox.db")}  # the demo's short commit interval goes
    data["control"] = {"socket": str(tmp / "control.sock")}
    data["runtime"] = {"clock": "trust"}  # health period at its default too
    return write_toml(tmp / "agent.toml", data)


class Payloads:
    """Sums payload bytes per distinct msg_id on a topic filter."""

    def __init__(self, port: int, topic: str) -> None:
        self.port, self.topic = port, topic
        self.seen: set[str] = set()
        self.bytes = 0
        self.messages = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port,
                                  identifier=f"bench-wear-{time.monotonic_ns()}") as c:
            await c.subscribe(self.topic, qos=1)
            self.ready.set()
            async for m in c.messages:
                if not isinstance(m.payload, bytes) or m.retain:
                    continue  # the retained birth / will is not data
                try:
                    body = json.loads(m.payload)
                except ValueError:
                    continue
                key = str(body.get("msg_id")) if isinstance(body, dict) else ""
                if key and key in self.seen:
                    continue
                self.seen.add(key)
                self.bytes += len(m.payload)
                self.messages += 1


async def measure(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-wear-", dir=ROOT) as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "mosq")
        broker.start()
        try:
            cfg = config(tmp, broker.port)
            sub = Payloads(broker.port, "city/#")
            task = asyncio.create_task(sub.run(), name="bench-wear-sub")
            await asyncio.wait_for(sub.ready.wait(), 10)
            notify = NotifySocket(tmp / "notify.sock")
            env = {**os.environ, "NOTIFY_SOCKET": str(notify.path),
                   "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli.main", "run", "-c", str(cfg),
                "--log-level", "warning", cwd=ROOT, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await asyncio.to_thread(notify.wait_ready, 60.0)
                io0 = proc_io(proc.pid)
                b0, m0 = sub.bytes, sub.messages
                await asyncio.sleep(seconds)  # the measurement interval
                io1 = proc_io(proc.pid)
                payload = sub.bytes - b0
                messages = sub.messages - m0
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 30)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
                notify.close()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            files = await asyncio.to_thread(state_files, tmp)
        finally:
            broker.stop()
    written = io1["write_bytes"] - io0["write_bytes"]
    cancelled = io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"]
    return {"seconds": seconds, "payload_bytes": payload, "messages": messages,
            "write_bytes": written, "cancelled_write_bytes": cancelled,
            "write_amplification": written / payload if payload else float("nan"),
            "net_write_amplification": (written - cancelled) / payload if payload
            else float("nan"),
            "files_after_stop": files}


def report(r: dict[str, Any]) -> str:
    return "\n".join([
        f"demo config at default outbox/runtime settings, {r['seconds']:.0f} s after READY",
        f"  payload bytes accepted (baseline) {r['payload_bytes']:>12,d}  "
        f"({r['messages']} messages, {r['payload_bytes'] / r['seconds'] / 1024:.1f} KiB/s)",
        f"  write_bytes to the block device   {r['write_bytes']:>12,d}  "
        f"= {r['write_amplification']:.1f} x payload",
        f"  less cancelled_write_bytes        {r['write_bytes'] - r['cancelled_write_bytes']:>12,d}"
        f"  = {r['net_write_amplification']:.1f} x payload",
        f"  state files after stop: {r['files_after_stop']}",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = asyncio.run(measure(args.seconds))
    print(json.dumps(r, indent=2) if args.json else report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
