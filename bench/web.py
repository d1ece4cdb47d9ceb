"""Idle cost of the status page and /metrics, beside the agent before they existed.

    python -m bench.web [--seconds 60] [--before REV] [--json]

Runs, one after the other, the same idle agent (10 synthetic sensors at 1 Hz, one stream, a
local mosquitto) as its own process and measures its CPU over the window and its RSS at the
end of it:

- before: the tree at REV (default: the parent of the commit that added ``agent/web``),
  extracted with ``git archive``; the raw baseline for "page off costs nothing";
- page off: this tree, no ``[web]`` section;
- page on, nobody watching: page and metrics on, no client;
- page on, one browser watching: the page open in Debian's headless Chromium for the window;
- a sleeping asyncio loop: the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e import IDLE_BASELINE  # noqa: E402
from bench.procs import NotifySocket, cpu_s, extract, python_child, rev_before, rss_kib, synthetic  # noqa: E402
from tests.broker import Mosquitto, free_port  # noqa: E402
from tests.harness import make_config, write_toml  # noqa: E402
from tests.web import chromium  # noqa: E402


def before_rev() -> str:
    return rev_before("agent/web/__init__.py")


def config(d: Path, port: int, web: dict[str, Any] | None) -> Path:
    sensors = [synthetic(f"s{i}", 1.0) for i in range(10)]
    data = make_config(d, port, sensors=sensors,
                       streams=[{"name": "cabinet", "sensors": [s["name"] for s in sensors]}],
                       runtime={"health_period_s": 30, "clock": "trust"})
    if web is not None:
        data["web"] = web
    return write_toml(d / "agent.toml", data)


@contextlib.contextmanager
def agent(tree: Path, cfg: Path) -> Iterator[subprocess.Popen[bytes]]:
    notify = NotifySocket(cfg.parent / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONPATH": str(tree)}
    with open(cfg.parent / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "run", "-c", str(cfg),
                                 "--log-format", "text"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=tree)
        try:
            notify.wait_ready(60)
            yield proc
        finally:
            proc.terminate()
            proc.wait(15)
            notify.close()


async def window(pid: int, seconds: float) -> tuple[float, float]:
    """(CPU % of one core over ``seconds``, RSS MiB at the end), after 2 s of settling."""
    await asyncio.sleep(2.0)
    c0, t0 = cpu_s(pid), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = cpu_s(pid), time.monotonic()
    return 100 * (c1 - c0) / (t1 - t0), rss_kib(pid) / 1024


async def measure(seconds: float, rev: str, tmp: Path) -> dict[str, Any]:
    broker = Mosquitto(tmp / "mosq")
    broker.start()
    out: dict[str, Any] = {"seconds": seconds}
    try:
        old = extract(rev, tmp / "before-tree")
        base = python_child(IDLE_BASELINE)
        try:
            for name, tree, web in (("before", old, None), ("page_off", ROOT, None),
                                    ("page_on_idle", ROOT, "idle"),
                                    ("page_on_watched", ROOT, "watched")):
                d = tmp / name
                d.mkdir()
                port = free_port()
                cfg = config(d, broker.port, None if web is None else
                             {"page": True, "metrics": True, "port": port})
                with agent(tree, cfg) as proc:
                    if web == "watched":
                        async with chromium(d) as browser:
                            page = await browser.new_page()
                            await page.goto(f"http://127.0.0.1:{port}/")
                            await page.wait_for_selector('[data-sensor="s0"] .badge.up')
                            cpu, rss = await window(proc.pid, seconds)
                            live = await page.locator("#live").inner_text()
                            if live != "live":
                                raise RuntimeError(f"the page was not live: {live!r}")
                    else:
                        cpu, rss = await window(proc.pid, seconds)
                out[name] = {"cpu_percent": cpu, "rss_mib": rss}
            b0, t0 = cpu_s(base.pid), time.monotonic()
            await asyncio.sleep(min(seconds, 10.0))
            out["sleeping_loop"] = {"cpu_percent": 100 * (cpu_s(base.pid) - b0)
                                    / (time.monotonic() - t0), "rss_mib": rss_kib(base.pid) / 1024}
        finally:
            base.kill()
            base.wait(10)
    finally:
        broker.stop()
    return out


def table(r: dict[str, Any]) -> list[str]:
    lines = [f"{'idle agent, 10 sensors at 1 Hz':34} {'CPU % core':>10} {'vs before':>9} "
             f"{'RSS MiB':>8} {'vs before':>9}"]
    ref = r["before"]
    for key, label in (("before", "before the page (raw baseline)"), ("page_off", "page off"),
                       ("page_on_idle", "page + metrics on, nobody looks"),
                       ("page_on_watched", "page on, one Chromium watching"),
                       ("sleeping_loop", "sleeping asyncio loop")):
        m = r[key]
        lines.append(f"{label:34} {m['cpu_percent']:10.2f} "
                     f"{m['cpu_percent'] - ref['cpu_percent']:+9.2f} {m['rss_mib']:8.1f} "
                     f"{m['rss_mib'] - ref['rss_mib']:+9.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of each window")
    p.add_argument("--before", default="", help="git revision of the 'before' agent")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rev = args.before or before_rev()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as d:
        r = asyncio.run(measure(args.seconds, rev, Path(d)))
    r["before_rev"] = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                                     capture_output=True, text=True).stdout.strip()
    print(f"before = {rev} ({r['before_rev']}), {args.seconds:.0f} s windows")
    for line in table(r):
        print(line)
    if args.json:
        print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
