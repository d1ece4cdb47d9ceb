"""The demo's two Eastron meters share one emulated RS-485 line and reach the feed."""

from __future__ import annotations

import asyncio
import contextlib

from agent.demo.run import demo_config_text, run_demo
from tests.broker import Mosquitto
from tests.harness import feed_of
from tests.waiting import until


def test_the_demo_config_puts_two_meters_on_one_line() -> None:
    import tomllib

    sensors = tomllib.loads(demo_config_text())["sensors"]
    meters = [s for s in sensors if s["driver"] == "modbus"]
    assert {s["options"]["profile"] for s in meters} == {"eastron-sdm630", "eastron-sdm120"}
    assert {s["options"]["emulator"]["bus"] for s in meters} == {"rs485"}
    assert len({s["address"] for s in meters}) == 2


async def test_demo_feed_carries_the_rs485_meters(broker: Mosquitto) -> None:
    async with feed_of(broker.port, "city/demo-cabinet/telemetry/feed", "demo-feed") as windows:
        demo = asyncio.create_task(run_demo(duration_s=14, broker=f"127.0.0.1:{broker.port}",
                                            quiet=True), name="demo")
        try:
            await until(lambda: any("grid.voltage_l1" in w["channels"]
                                    and "outlet.energy" in w["channels"] for w in windows),
                        30, "a feed window with both meters")
            rc = await asyncio.wait_for(demo, 40)
            assert rc == 0
        finally:
            demo.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(demo, return_exceptions=True)
    w = next(w for w in windows if "grid.voltage_l1" in w["channels"])
    volts = w["channels"]["grid.voltage_l1"]
    assert 200 < volts["mean"] < 260 and volts["count"] >= 1
    assert w["channels"]["outlet.energy"]["mean"] > 0
