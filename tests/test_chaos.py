"""Faults injected while the agent publishes: nothing accepted is lost.

For every fault a persistent-session subscriber (the "cloud") follows the feed, and the outbox's
committed seqs are compared with what it received: accepted, received, lost (accepted but never
received) and duplicated (deliveries beyond the first of a msg_id). The summary table is written
at the end of the module. Disk full is the one fault where drops are expected: they must follow
the policy (raw first) and be counted, so that accepted = received + counted drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config.schema import OutboxConfig
from agent.control.client import ControlClient
from agent.feed.messages import health_message
from agent.outbox.store import Outbox
from agent.runtime import Agent
from drivers.emulated.i2c_setup import emulated_bus
from tests import chaos_table
from tests.broker import Mosquitto, free_port
from tests.harness import ROOT, make_config, running_agent, until, write_toml

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

GW = "gw-test"
PREFIX = "t"
N = 3
RAW = {"share": "raw"}


@dataclass
class Cloud:
    """A QoS 1 subscriber with a persistent session that reconnects while the broker is away."""

    host: str
    port: int
    feed: list[dict[str, Any]] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, identifier="chaos-cloud",
                                          clean_session=False, timeout=3,
                                          protocol=aiomqtt.ProtocolVersion.V311) as c:
                    c.pending_calls_threshold = 100_000
                    await c.subscribe(f"{PREFIX}/{GW}/#", qos=1)
                    self.connected.set()
                    async for m in c.messages:
                        try:
                            body = json.loads(m.payload) if isinstance(m.payload, bytes) else 0
                        except ValueError:
                            continue  # the retained online/offline status
                        if isinstance(body, dict) and "seq" in body:
                            self.feed.append(body)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)  # the broker is down: try again

    def seqs(self) -> set[int]:
        return {int(b["seq"]) for b in self.feed}


@contextlib.asynccontextmanager
async def cloud(b: Mosquitto) -> AsyncIterator[Cloud]:
    c = Cloud(b.host, b.port)
    task = asyncio.create_task(c.follow(), name="chaos-cloud")
    try:
        await asyncio.wait_for(c.connected.wait(), 10)
        yield c
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)


@dataclass
class Tally:
    accepted: int
    received: int
    lost: int
    duplicated: int
    missing: list[int]


def tally(accepted: set[int], c: Cloud) -> Tally:
    ids = [b["msg_id"] for b in c.feed if int(b["seq"]) in accepted]
    got = c.seqs() & accepted
    missing = sorted(accepted - got)
    return Tally(len(accepted), len(got), len(missing), len(ids) - len(set(ids)), missing[:10])


async def settle(accepted: set[int], c: Cloud, timeout_s: float = 20.0) -> Tally:
    """Wait (bounded) for every accepted seq to arrive, then count."""
    with contextlib.suppress(AssertionError):
        await until(lambda: accepted <= c.seqs(), timeout_s, "every accepted seq received")
    return tally(accepted, c)


def record(fault: str, t: Tally, note: str = "", recover: list[float] | None = None) -> None:
    chaos_table.add(fault, t.accepted, t.received, t.lost, t.duplicated,
                    chaos_table.seconds(recover or []), note)


@pytest.fixture(scope="module", autouse=True)
def summary_table(request: pytest.FixtureRequest) -> Iterator[None]:
    with chaos_table.printed(request):
        yield


async def recovered(since: float, done: Callable[[], bool], what: str) -> float:
    """Seconds from ``since`` (monotonic) until ``done()`` (polled every 5 ms, bounded)."""
    await until(done, 30, what)
    return time.monotonic() - since


def marker(db: Path) -> int:
    """Put one message into a new outbox file before the agent opens it: its seq is where the
    accepted range starts."""
    ob = Outbox(OutboxConfig(path=str(db), commit_interval_ms=10), GW)
    ob.open()
    seq = ob.put("health", "health", health_message(GW, {"marker": True}))
    assert ob.flush()
    ob.close()
    return seq


def committed(first: int, ob_stats: dict[str, Any]) -> set[int]:
    """Seqs committed by an in-process agent's outbox since ``first``, less a skipped block."""
    seqs = set(range(first, ob_stats["accepted_seq"] + 1))
    if ob_stats["seq_skipped"]:
        lo, hi = ob_stats["seq_skipped"]
        seqs -= set(range(lo, hi + 1))
    return seqs


def synthetic(name: str, period_s: float) -> dict[str, Any]:
    return {"name": name, "driver": "synthetic", "period_s": period_s,
            "options": {"amplitude": 0.5, "cycle_s": 60.0}}


def config(tmp: Path, b: Mosquitto, **sections: Any) -> dict[str, Any]:
    data = make_config(tmp, b.port, **sections)
    data["mqtt"].update(host=b.host, reconnect_max_s=0.5, tls=False)
    data["runtime"].update(backoff_initial_s=0.05, backoff_max_s=0.2)
    return data


def above(get: Callable[[], int], floor: int) -> Callable[[], bool]:
    return lambda: get() > floor


def _sensor(agent: Agent, name: str) -> dict[str, Any]:
    return next(s for s in agent.snapshot()["sensors"] if s["name"] == name)


def _outbox(agent: Agent) -> dict[str, Any]:
    assert agent.pipeline is not None
    return agent.pipeline.outbox.stats()


# -- broker outages --------------------------------------------------------------------------


async def test_broker_stop_start(tmp_path: Path, private_broker: Mosquitto) -> None:
    b = private_broker
    first = marker(tmp_path / "outbox.db")
    data = config(tmp_path, b, sensors=[synthetic("s0", 0.02), synthetic("s1", 0.02)],
                  streams=[{"name": "fast", "sensors": ["s0", "s1"], "window_s": 1, **RAW}])
    times: list[float] = []
    async with cloud(b) as c, running_agent(data) as agent:
        assert agent.pipeline is not None
        uplink = agent.pipeline.uplink
        for _ in range(N):
            n = len(c.feed)
            await until(above(lambda: len(c.feed), n + 50), what="publishing")
            b.stop()
            seq = int(_outbox(agent)["accepted_seq"])
            await until(above(lambda: _outbox(agent)["accepted_seq"], seq + 100),
                        what="accepting while the broker is down")
            acked = uplink.status()["acked"]
            await asyncio.to_thread(b.start)  # returns once the port accepts connections
            times.append(await recovered(time.monotonic(),
                                         above(lambda: uplink.status()["acked"], acked),
                                         "the first PUBACK after the restart"))
        await until(lambda: agent.pipeline is not None
                    and agent.pipeline.uplink.status()["state"] == "connected")
        accepted = committed(first, _outbox(agent))
        t = await settle(accepted, c)
    record(f"broker stop/start x{N}", t, recover=times)
    assert t.lost == 0, t.missing


# -- agent kill -9 ---------------------------------------------------------------------------

OPEN_LINE = re.compile(r"outbox \S+ open: \d+ rows, next seq (\d+), boot (\w+)")


def _status(sock: Path) -> dict[str, Any]:
    with ControlClient(sock, timeout_s=5) as cc:
        result: dict[str, Any] = cc.call("status")
        return result


def _spawn(cfg: Path, log: Path, netns: str | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "agent.cli.main", "run", "-c", str(cfg), "--log-format", "text"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


async def _opened(log: Path, skip: int) -> int:
    """The first seq of the run whose log starts after ``skip`` open lines."""
    found: list[int] = []

    def seen() -> bool:
        found[:] = [int(m.group(1)) for m in OPEN_LINE.finditer(log.read_text())]
        return len(found) > skip

    await until(seen, 30, "the outbox open line")
    return found[skip]


async def _accepted_by(sock: Path, at_least: int) -> int:
    """Poll the control socket until the outbox committed ``at_least``; return accepted_seq."""
    last = [0]

    def ok() -> bool:
        with contextlib.suppress(OSError, ValueError, RuntimeError, Exception):
            last[0] = int(_status(sock)["outbox"]["accepted_seq"])
        return last[0] >= at_least

    await until(ok, 30, f"accepted_seq >= {at_least}")
    return last[0]


async def _drain_and_check(tmp: Path, b: Mosquitto, runs: list[tuple[int, int]], c: Cloud,
                           fault: str) -> Tally:
    """Start the agent without sensors on the same outbox until it is empty, then count."""
    data = config(tmp, b)
    async with running_agent(data) as agent:
        await until(lambda: _outbox(agent)["rows"] == 0, 30, "outbox drained")
    accepted: set[int] = set()
    runs = sorted(runs)
    for i, (first, last) in enumerate(runs):
        bound = runs[i + 1][0] if i + 1 < len(runs) else 2**63
        top = max([last, *(s for s in c.seqs() if first <= s < bound)])
        accepted |= set(range(first, top + 1))
    # Anything received beyond what was known committed was committed too.
    t = await settle(accepted, c)
    ob = Outbox(OutboxConfig(path=data["outbox"]["path"]), GW)
    ob.open()
    left = ob.stats()["rows"]
    ob.close()
    record(fault, t, f"outbox rows left {left}")
    assert left == 0
    return t


async def test_agent_kill_9(tmp_path: Path, private_broker: Mosquitto) -> None:
    b = private_broker
    data = config(tmp_path, b, sensors=[synthetic("s0", 0.02), synthetic("s1", 0.02)],
                  streams=[{"name": "fast", "sensors": ["s0", "s1"], "window_s": 1, **RAW}])
    cfg = write_toml(tmp_path / "agent.toml", data)
    log = tmp_path / "agent.log"
    runs: list[tuple[int, int]] = []
    async with cloud(b) as c:
        for k in range(N):
            proc = _spawn(cfg, log)
            try:
                first = await _opened(log, k)
                last = await _accepted_by(tmp_path / "control.sock", first + 100 + 50 * k)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            runs.append((first, last))
        t = await _drain_and_check(tmp_path, b, runs, c, f"agent kill -9 x{N}")
    assert t.lost == 0, t.missing


# -- device faults (in-process agent, product emulators) -------------------------------------


async def test_serial_unplug_replug(tmp_path: Path, private_broker: Mosquitto) -> None:
    b = private_broker
    first = marker(tmp_path / "outbox.db")
    data = config(tmp_path, b,
                  sensors=[{"name": "air", "driver": "pms5003", "port": "emulated",
                            "period_s": 1, "timeout_s": 0.5,
                            "options": {"emulator": {"interval_s": 0.05}}}],
                  streams=[{"name": "env", "sensors": ["air"], "window_s": 1, **RAW}])
    times: list[float] = []
    async with cloud(b) as c, running_agent(data) as agent:
        assert agent.pipeline is not None and agent.pipeline.ctx is not None
        emu = agent.pipeline.ctx.shared["emulated:pms5003:air"]
        for _ in range(N):
            n = int(_sensor(agent, "air")["readings"])
            await until(above(lambda: _sensor(agent, "air")["readings"], n + 5), what="air data")
            failures = int(_sensor(agent, "air")["failures"])
            emu.unplug()
            await until(above(lambda: _sensor(agent, "air")["failures"], failures),
                        what="unplug noticed")
            n = int(_sensor(agent, "air")["readings"])
            emu.replug()
            times.append(await recovered(time.monotonic(),
                                         above(lambda: _sensor(agent, "air")["readings"], n),
                                         "the first reading after the replug"))
            await until(lambda: _sensor(agent, "air")["state"] == "up", what="replugged")
        n = int(_sensor(agent, "air")["readings"])
        await until(lambda: _sensor(agent, "air")["readings"] > n + 5, what="data resumes")
        t = await settle(committed(first, _outbox(agent)), c)
    record(f"serial unplug/replug x{N}", t, recover=times)
    assert t.lost == 0, t.missing


async def test_i2c_nack_storm(tmp_path: Path, private_broker: Mosquitto) -> None:
    b = private_broker
    first = marker(tmp_path / "outbox.db")
    data = config(tmp_path, b,
                  sensors=[{"name": "env", "driver": "bme280", "bus": "emulated",
                            "address": 0x76, "period_s": 0.05}],
                  streams=[{"name": "cabinet", "sensors": ["env"], "window_s": 1, **RAW}])
    times: list[float] = []
    async with cloud(b) as c, running_agent(data) as agent:
        assert agent.pipeline is not None and agent.pipeline.ctx is not None
        bus = emulated_bus(agent.pipeline.ctx)
        await until(lambda: bus.chip(0x76) is not None, what="chip attached")
        chip = bus.chip(0x76)
        assert chip is not None
        for _ in range(N):
            failures = int(_sensor(agent, "env")["failures"])
            chip.nack_storm(4)
            await until(above(lambda: _sensor(agent, "env")["failures"], failures),
                        what="storm seen")
            n = int(_sensor(agent, "env")["readings"])
            # From the first failure seen (the storm lasts 4 transfers) to data again.
            times.append(await recovered(time.monotonic(),
                                         above(lambda: _sensor(agent, "env")["readings"], n),
                                         "data after the storm"))
            await until(above(lambda: _sensor(agent, "env")["readings"], n + 3),
                        what="data after the storm")
        t = await settle(committed(first, _outbox(agent)), c)
    record(f"I2C NACK storm x{N}", t, recover=times)
    assert t.lost == 0, t.missing


# -- disk full -------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full fault: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_disk_full_drops_follow_the_policy(tmp_path: Path,
                                                 private_broker: Mosquitto) -> None:
    b = private_broker
    # 16 MiB, not less: SQLite lets the WAL grow to ~4 MiB before its automatic checkpoint, and
    # a disk smaller than that stays full after the filler is gone.
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        db = disk / "outbox.db"
        first = marker(db)
        data = config(tmp_path, b,
                      sensors=[synthetic("s0", 0.01), synthetic("s1", 0.5)],
                      streams=[{"name": "fast", "sensors": ["s0"], "window_s": 1, **RAW},
                               {"name": "slow", "sensors": ["s1"], "window_s": 1}],
                      outbox={"path": str(db), "commit_interval_ms": 50, "max_rows": 300,
                              "max_bytes": 64 * 1024},
                      runtime={"health_period_s": 0.5, "clock": "trust"})
        async with cloud(b) as c:
            b.stop()
            async with running_agent(data) as agent:
                await until(lambda: _outbox(agent)["drops"]["raw"] > 200, what="bounds drops")
                # Now fill the disk itself: commits fail, the agent keeps going.
                filler = disk / "filler"
                with contextlib.suppress(OSError), open(filler, "wb") as fh:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                await until(lambda: _outbox(agent)["commit_errors"] > 0, what="disk full seen")
                n = int(_sensor(agent, "s0")["readings"])
                await until(lambda: _sensor(agent, "s0")["readings"] > n + 100,
                            what="still acquiring on a full disk")
                filler.unlink()
                errors = _outbox(agent)["commit_errors"]
                seq = int(_outbox(agent)["accepted_seq"])
                back = await recovered(time.monotonic(),
                                       lambda: _outbox(agent)["accepted_seq"] > seq,
                                       "the first commit once space is back")
                await until(lambda: _outbox(agent)["accepted_seq"] > seq + 50,
                            what="commits again once space is back")
            assert agent.pipeline is not None
            final = agent.pipeline.outbox.stats()  # after the stop: every drop counted
            drops = final["drops"]
            b.start()
            async with running_agent(config(tmp_path, b, outbox={"path": str(db)})) as drain:
                await until(lambda: _outbox(drain)["rows"] == 0, 30, "drained")
            await until(lambda: max(c.seqs(), default=0) >= final["accepted_seq"], 20,
                        "last seq received")
    produced = set(range(first, final["next_seq"]))
    if final["seq_skipped"]:
        produced -= set(range(final["seq_skipped"][0], final["seq_skipped"][1] + 1))
    t = tally(produced, c)
    dropped = sum(drops.values())
    record("disk full (16 MiB tmpfs)", t, recover=[back], note=
           f"drops {drops}, commit errors {errors}, not received and not counted "
           f"{t.lost - dropped}")
    assert drops["raw"] > 0 and drops["window"] == 0 and drops["inference"] == 0
    assert t.duplicated == 0
    assert t.lost == dropped, t.missing  # every gap is a counted drop


# -- network delay and loss ------------------------------------------------------------------


@contextlib.contextmanager
def netns_link(tag: str) -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to the host by a veth pair with netem on both ends."""
    if not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("ip/tc (iproute2) are not installed")
    ns, host_if, ns_if = f"chaos{tag}", f"vch{tag}", f"vcn{tag}"
    host_ip, ns_ip = "10.231.7.1", "10.231.7.2"
    setup = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", ns],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if],
        ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ["tc", "qdisc", "add", "dev", host_if, "root", "netem", "delay", "40ms", "10ms",
         "loss", "5%"],
        ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_if, "root", "netem",
         "delay", "40ms", "10ms", "loss", "5%"],
    ]
    try:
        for cmd in setup:
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot build the netem link ({' '.join(cmd)}): {r.stderr.strip()}")
        yield ns, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


async def test_network_delay_and_loss(tmp_path: Path) -> None:
    with netns_link(str(os.getpid() % 10_000)) as (ns, host_ip, _ns_ip):
        port = free_port()
        b = Mosquitto(tmp_path / "mosq", port=port,
                      listeners=f"listener {port} {host_ip}\nallow_anonymous true\n")
        b.host = host_ip
        b.start()
        try:
            data = config(tmp_path, b, sensors=[synthetic("s0", 0.02)],
                          streams=[{"name": "fast", "sensors": ["s0"], "window_s": 1, **RAW}])
            cfg = write_toml(tmp_path / "agent.toml", data)
            log = tmp_path / "agent.log"
            async with cloud(b) as c:
                proc = _spawn(cfg, log, netns=ns)
                try:
                    first = await _opened(log, 0)
                    await until(lambda: len(c.feed) > 300, 60, "publishing over the lossy link")
                    last = await _accepted_by(tmp_path / "control.sock", first + 300)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(15)
                t = await _drain_and_check(tmp_path, b, [(first, last)], c,
                                           "netem 40+-10 ms, 5 % loss")
        finally:
            b.stop()
    assert t.lost == 0, t.missing
