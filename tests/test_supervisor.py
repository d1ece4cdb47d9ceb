"""Sensor supervision: a crashing sensor is restarted and reported; others keep producing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from agent.clock import SystemClock
from agent.readings import Reading
from agent.supervisor import SensorSupervisor, backoff_delay
from drivers.base import DeviceNotReady, PolledSensor
from tests.waiting import until as _until


class Flaky(PolledSensor):
    """Fails every ``fail_every``-th sample; can be made absent."""

    def __init__(self, name: str, fail_every: int = 0) -> None:
        super().__init__(name, SystemClock(), 0.005)
        self.fail_every = fail_every
        self.absent = False
        self.n = 0
        self.opens = 0
        self.closes = 0

    async def open(self) -> None:
        self.opens += 1
        if self.absent:
            raise DeviceNotReady("no ACK", where=f"i2c-1 0x76 reg 0xD0 ({self.name})")

    async def close(self) -> None:
        self.closes += 1

    async def sample(self) -> Sequence[Reading]:
        self.n += 1
        if self.fail_every and self.n % self.fail_every == 0:
            raise RuntimeError("boom")
        return [self.reading("temperature", 20.0, "degC")]


def _sup(sensor: Flaky, out: list[Reading], down_after: int = 3) -> SensorSupervisor:
    return SensorSupervisor(sensor.name, "test", lambda: sensor, out.append,
                            backoff_initial_s=0.001, backoff_max_s=0.01, down_after=down_after,
                            open_timeout_s=1.0, rng=random.Random(1))



async def test_crashing_sensor_is_restarted_while_others_keep_producing() -> None:
    good_out: list[Reading] = []
    bad_out: list[Reading] = []
    good, bad = Flaky("good"), Flaky("bad", fail_every=3)
    sg, sb = _sup(good, good_out), _sup(bad, bad_out)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sg.run(), name="good"), tg.create_task(sb.run(), name="bad")]
        await _until(lambda: sb.health.restarts >= 3 and len(good_out) >= 50)
        for t in tasks:
            t.cancel()
    assert sb.health.failures >= 3
    assert "RuntimeError: boom" in sb.health.last_error
    assert bad.closes >= 3 and bad.opens >= 4  # closed after each crash, reopened
    assert sg.health.failures == 0 and sg.health.state == "stopped"
    assert len(bad_out) > 0  # it produced between crashes
    snap = sb.snapshot(0.0)
    assert snap["restarts"] >= 3 and snap["failures"] >= 3


async def test_absent_device_goes_down_then_recovers() -> None:
    out: list[Reading] = []
    dev = Flaky("env")
    dev.absent = True
    sup = _sup(dev, out, down_after=3)
    task = asyncio.create_task(sup.run())
    await _until(lambda: sup.health.state == "down")
    assert "i2c-1 0x76 reg 0xD0" in sup.health.last_error
    assert out == []
    dev.absent = False
    await _until(lambda: sup.health.state == "up" and len(out) > 0)
    assert sup.health.consecutive_failures == 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_backoff_is_capped_jittered_and_never_zero() -> None:
    rng = random.Random(0)
    delays = [backoff_delay(a, 0.5, 30.0, rng) for a in range(40)]
    assert all(0.25 <= d <= 30.0 for d in delays)
    assert max(delays[10:]) <= 30.0 and min(delays[10:]) >= 15.0
    assert len({round(d, 6) for d in delays[10:]}) > 1  # jittered
