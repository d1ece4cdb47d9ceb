"""Device faults seen from the whole agent: it keeps running, health shows the state, data resumes.

The devices are the product's emulators, reached through the running pipeline's build context.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiomqtt

from agent.feed.raw_batch import readings_of
from agent.runtime import Agent
from drivers.base import BuildContext
from drivers.emulated.bme280 import Bme280Emulator
from drivers.emulated.i2c_bus import EmulatedI2CBus
from drivers.emulated.i2c_setup import emulated_bus
from drivers.i2c.bus import install_emulated_bus
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until


def _sensor(agent: Agent, name: str) -> dict[str, Any]:
    return next(s for s in agent.snapshot()["sensors"] if s["name"] == name)


def _i2c_config(tmp: Path, port: int) -> dict[str, Any]:
    return make_config(
        tmp, port,
        sensors=[
            {"name": "env", "driver": "bme280", "bus": "emulated", "address": 0x76,
             "period_s": 0.05},
            {"name": "solar", "driver": "ina219", "bus": "emulated", "address": 0x40,
             "period_s": 0.05, "options": {"shunt_ohms": 0.1, "max_current_a": 3.2}},
        ],
        streams=[{"name": "cabinet", "sensors": ["env", "solar"], "window_s": 1}],
        runtime={"backoff_initial_s": 0.02, "backoff_max_s": 0.1, "down_after": 3,
                 "health_period_s": 0.3, "clock": "trust"},
    )


async def test_i2c_device_absent_at_start_then_plugged_in(tmp_path: Path,
                                                          broker: Mosquitto) -> None:
    absent = Bme280Emulator()
    absent.unplug()

    def setup(ctx: BuildContext) -> None:
        bus = EmulatedI2CBus()
        bus.attach(0x76, absent)
        install_emulated_bus(ctx, bus)

    async with running_agent(_i2c_config(tmp_path, broker.port), setup=setup) as agent:
        await until(lambda: _sensor(agent, "env")["state"] == "down", what="env down")
        env = _sensor(agent, "env")
        assert "0x76" in env["last_error"] and "no ACK" in env["last_error"]
        n_solar = _sensor(agent, "solar")["readings"]
        await until(lambda: _sensor(agent, "solar")["readings"] > n_solar + 5,
                    what="the other sensor keeps producing")
        absent.replug()
        await until(lambda: _sensor(agent, "env")["state"] == "up", what="env recovers")
        await until(lambda: _sensor(agent, "env")["readings"] > 3, what="env data")


async def test_i2c_vanish_nack_storm_and_ina219_reset_mid_run(tmp_path: Path,
                                                              broker: Mosquitto) -> None:
    data = _i2c_config(tmp_path, broker.port)
    health_states: list[str] = []

    async def watch_health(ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="health-watch") as c:
            await c.subscribe("t/gw-test/health", qos=1)
            ready.set()
            async for msg in c.messages:
                doc = json.loads(msg.payload)  # type: ignore[arg-type]
                health_states.extend(f"{s['name']}:{s['state']}"
                                     for s in doc["health"]["sensors"])

    ready = asyncio.Event()
    watcher = asyncio.create_task(watch_health(ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with running_agent(data) as agent:
            assert agent.pipeline is not None and agent.pipeline.ctx is not None
            bus = emulated_bus(agent.pipeline.ctx)
            await until(lambda: bus.chip(0x76) is not None and bus.chip(0x40) is not None)
            env, ina = bus.chip(0x76), bus.chip(0x40)
            assert env is not None and ina is not None
            await until(lambda: _sensor(agent, "env")["readings"] > 3)

            # Vanishes mid-run, is reported down (also to the cloud), and comes back.
            env.unplug()
            await until(lambda: _sensor(agent, "env")["state"] == "down", what="down")
            await until(lambda: "env:down" in health_states, what="health message shows down")
            env.replug()
            await until(lambda: _sensor(agent, "env")["state"] == "up", what="back up")
            n = _sensor(agent, "env")["readings"]
            await until(lambda: _sensor(agent, "env")["readings"] > n + 3, what="data resumes")

            # A NACK storm: counted as failures, then data resumes by itself.
            failures = _sensor(agent, "env")["failures"]
            env.nack_storm(4)
            await until(lambda: _sensor(agent, "env")["failures"] > failures, what="storm seen")
            n = _sensor(agent, "env")["readings"]
            await until(lambda: _sensor(agent, "env")["readings"] > n + 3, what="after storm")

            # The INA219 browns out: calibration re-written, current right again.
            ina.pin(12.6, 1.25)  # type: ignore[attr-defined]
            await until(lambda: abs(_last(agent, "solar", "current") - 1.25) < 0.01)
            ina.brown_out()  # type: ignore[attr-defined]
            await until(lambda: _sensor(agent, "solar")["counters"].get("resets", 0) >= 1,
                        what="recalibration counted")
            n = _sensor(agent, "solar")["readings"]
            await until(lambda: _sensor(agent, "solar")["readings"] > n + 4)
            assert abs(_last(agent, "solar", "current") - 1.25) < 0.01
            assert _sensor(agent, "solar")["state"] == "up"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def _last(agent: Agent, sensor: str, quantity: str) -> float:
    values = _sensor(agent, sensor)["last_values"]
    return float(values[quantity]["value"]) if quantity in values else float("nan")


async def test_serial_unplug_and_garbage_through_the_agent(tmp_path: Path,
                                                           broker: Mosquitto) -> None:
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": "air", "driver": "pms5003", "port": "emulated", "period_s": 1,
                  "timeout_s": 0.5, "options": {"emulator": {"interval_s": 0.05}}}],
        streams=[{"name": "env", "sensors": ["air"], "window_s": 1}],
        runtime={"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "clock": "trust"})
    async with running_agent(data) as agent:
        assert agent.pipeline is not None and agent.pipeline.ctx is not None
        await until(lambda: _sensor(agent, "air")["readings"] > 10, what="air data")
        emu = agent.pipeline.ctx.shared["emulated:pms5003:air"]

        emu.inject("garbage", 5)
        emu.inject("corrupt", 3)
        await until(lambda: sum(_sensor(agent, "air")["counters"].values()) >= 3,
                    what="bad frames counted")
        assert _sensor(agent, "air")["state"] == "up"

        emu.unplug()
        await until(lambda: _sensor(agent, "air")["failures"] >= 1, what="unplug noticed")
        emu.replug()
        await until(lambda: _sensor(agent, "air")["state"] == "up", what="replugged")
        n = _sensor(agent, "air")["readings"]
        await until(lambda: _sensor(agent, "air")["readings"] > n + 5, what="data resumes")
        # Every published value is a decoded frame: nothing out of a PM sensor's range.
        for q, v in _sensor(agent, "air")["last_values"].items():
            assert 0 <= v["value"] < 10_000, (q, v)


async def test_published_windows_carry_quality_counts_and_leave_faults_out(
        tmp_path: Path, broker: Mosquitto) -> None:
    """Spikes, a stuck run and dropouts from a sensor, seen as the cloud sees them."""
    base, amplitude, spike = 20.0, 1.0, 40.0
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": "gen", "driver": "synthetic", "period_s": 0.01,
                  "options": {"base": base, "amplitude": amplitude, "cycle_s": 30.0,
                              "spike_every": 37, "spike_size": spike,
                              "stuck_every": 150, "stuck_len": 12,
                              "dropout_every": 230, "dropout_len": 40},
                  "clean": {"temperature": {"stuck_count": 5}}}],
        streams=[{"name": "s", "sensors": ["gen"], "window_s": 1, "share": "raw"}])
    windows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    raw_messages: list[dict[str, Any]] = []
    ready = asyncio.Event()

    async def subscribe() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="quality") as c:
            await c.subscribe("t/gw-test/#", qos=1)
            ready.set()
            async for msg in c.messages:
                topic = str(msg.topic)
                if topic.endswith("/status"):
                    continue  # plain "online"/"offline", not JSON
                doc = json.loads(msg.payload)  # type: ignore[arg-type]
                if "/telemetry/" in topic:
                    windows.append(doc)
                elif "/raw/" in topic:
                    raw_messages.append(doc)
                    raw.extend(readings_of(doc))

    sub = asyncio.create_task(subscribe())
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with running_agent(data) as agent:
            await until(lambda: len(windows) >= 4, timeout_s=20, what="four windows")
            pipeline = agent.pipeline
        assert pipeline is not None
        await until(lambda: len(raw_messages) >= pipeline.raw_published
                    and len(windows) >= pipeline.windows_published, what="all delivered")
    finally:
        sub.cancel()
        await asyncio.gather(sub, return_exceptions=True)

    spikes = [r for r in raw if r["value"] > base + amplitude + spike / 2]
    stuck = [r for r in raw if "stuck" in r["reasons"]]
    assert spikes and stuck
    # The spike test needs a full window of recent history; a pause of the sensor longer than
    # half that window (a dropout, or a loaded host stalling the loop) rightly forgets it. So
    # judge the spikes that follow an unbroken run of readings.
    temps = sorted((r for r in raw if r["quantity"] == "temperature"),
                   key=lambda r: r["sampled_ns"])
    at = {id(r): i for i, r in enumerate(temps)}

    def unbroken_before(r: dict[str, Any], n: int = 40, gap_ns: int = 30_000_000) -> bool:
        i = at.get(id(r), -1)
        run = temps[max(0, i - n):i + 1]
        return i >= n and all(b["sampled_ns"] - a["sampled_ns"] <= gap_ns
                              for a, b in itertools.pairwise(run))

    judged = [r for r in spikes if unbroken_before(r)]
    assert judged, "no spike followed an unbroken run of readings"
    assert all(r["quality"] != "good" and "spike" in r["reasons"] for r in judged)
    # Each window's counts agree with the readings the cloud saw, and the faulty ones are out.
    by_start: dict[str, list[dict[str, Any]]] = {}
    for w in windows:
        ch = w["channels"]["gen.temperature"]
        assert ch["max"] is None or ch["max"] < base + amplitude + 0.5, w
        by_start.setdefault(w["start"], []).append(ch)
    flagged = sum(1 for r in raw if r["quality"] != "good")
    totals = [sum(c[k] for cs in by_start.values() for c in cs) for k in ("count", "suspect",
                                                                          "bad")]
    assert totals[1] + totals[2] == flagged
    assert sum(totals) == len(raw)
    # Dropouts: some full windows hold fewer than the 100 readings a second would give.
    assert any(sum(c["count"] + c["suspect"] + c["bad"] for c in cs) < 90
               for cs in list(by_start.values())[1:-1])
