"""`status` shows how old the last error is and when the next attempt comes: a refused
broker for the uplink (a real mosquitto that wants a password) and an absent sensor."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from agent.clock import SystemClock
from agent.config.schema import MqttConfig
from agent.control.view import sensor_errors, uplink_line
from agent.readings import Reading
from agent.supervisor import SensorSupervisor
from agent.uplink.backoff import Backoff
from drivers.base import DeviceNotReady, PolledSensor
from tests.broker import free_port
from tests.test_uplink import broker_at, make, running
from tests.waiting import until


class Absent(PolledSensor):
    def __init__(self) -> None:
        super().__init__("env", SystemClock(), 1.0)

    async def open(self) -> None:
        raise DeviceNotReady("no ACK", where="i2c-1 0x76")

    async def sample(self) -> Sequence[Reading]:
        return []


async def test_backoff_counts_down_while_it_waits() -> None:
    backoff = Backoff(10.0)
    assert backoff.remaining_s() is None
    job = asyncio.create_task(backoff.sleep(30.0))
    await until(lambda: backoff.remaining_s() is not None, 10, "the wait to start")
    left = backoff.remaining_s()
    assert left is not None and 0 < left <= 30.0
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)
    assert backoff.remaining_s() is None


async def test_a_failing_sensor_shows_its_error_age_and_retry() -> None:
    out: list[Reading] = []
    sup = SensorSupervisor("env", "bme280", Absent, out.append, backoff_initial_s=30.0,
                           backoff_max_s=60.0, down_after=3, open_timeout_s=1.0,
                           rng=random.Random(1))
    task = asyncio.create_task(sup.run())
    try:
        await until(lambda: sup.health.next_retry_mono is not None, 10, "the first failure")
        snap = sup.snapshot(time.monotonic())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert snap["last_error_age_s"] is not None and snap["last_error_age_s"] >= 0
    assert 0 <= snap["next_retry_in_s"] <= snap["next_retry_s"]
    text = sensor_errors(snap)
    assert "retry in " in text and "no ACK" in text and " ago)" in text, text


async def test_a_refused_uplink_shows_the_error_age_and_the_next_attempt(
        tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "gateway", "right"], check=True,
                   capture_output=True)
    creds = tmp_path / "creds"
    creds.write_text("gateway\nwrong\n")
    port = free_port()
    b = broker_at(tmp_path / "mosq", port=port, listeners=(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"))
    try:
        ob, up = make(tmp_path, MqttConfig(host=b.host, port=b.port, reconnect_max_s=30.0,
                                           credentials_file=str(creds)))
        async with running(ob, up):
            await until(lambda: up.status()["next_attempt_in_s"] is not None
                        and up.status()["last_error"], 30, "a refused connect and a wait")
            st = up.status()
        ob.close()
    finally:
        b.stop()
    assert st["state"] in ("waiting", "probing")
    assert st["last_error_age_s"] >= 0 and st["next_attempt_in_s"] >= 0
    line = uplink_line(st)
    assert "next attempt in " in line and "last error (" in line and "refused" in line, line
