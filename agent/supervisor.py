"""Runs each sensor in its own task and keeps it alive.

A sensor that raises is logged, counted, closed and started again after a capped, jittered
backoff. After ``down_after`` consecutive failures without a reading it is shown ``down``; it
comes back to ``up`` by itself on the first reading after the device answers again. Nothing a
sensor does can stop the agent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.aio import within
from agent.readings import Reading
from drivers.base import Emit, Sensor

log = logging.getLogger(__name__)

State = Literal["starting", "up", "backoff", "down", "stopped"]
CLOSE_TIMEOUT_S = 2.0


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter in [d/2, d]: never zero, so a storm cannot spin."""
    d: float = min(max_s, initial_s * 2.0 ** min(attempt, 30))
    return d / 2 + rng.uniform(0, d / 2)


@dataclass
class SensorHealth:
    name: str
    driver: str
    state: State = "starting"
    readings: int = 0
    failures: int = 0  # every exception out of open()/run()
    consecutive_failures: int = 0
    restarts: int = 0
    last_error: str = ""
    last_error_wall: float | None = None
    last_reading_mono: float | None = None
    last_values: dict[str, tuple[float, str, str]] = field(default_factory=dict)
    driver_counters: dict[str, int] = field(default_factory=dict)
    next_retry_s: float | None = None
    last_error_mono: float | None = None
    next_retry_mono: float | None = None  # when the retry under way opens the sensor again

    def snapshot(self, now_mono: float) -> dict[str, Any]:
        last = self.last_reading_mono
        age = None if last is None else round(now_mono - last, 3)
        error_at, retry_at = self.last_error_mono, self.next_retry_mono
        return {
            "name": self.name,
            "driver": self.driver,
            "state": self.state,
            "readings": self.readings,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_age_s": None if error_at is None else round(now_mono - error_at, 3),
            "last_reading_age_s": age,
            "last_values": {q: {"value": v, "unit": u, "quality": ql}
                            for q, (v, u, ql) in self.last_values.items()},
            "counters": dict(self.driver_counters),
            "next_retry_s": self.next_retry_s,
            "next_retry_in_s": None if retry_at is None else round(max(0.0, retry_at - now_mono),
                                                                   3),
        }


class SensorSupervisor:
    def __init__(
        self,
        name: str,
        driver: str,
        make: Callable[[], Sensor],
        emit: Emit,
        *,
        backoff_initial_s: float,
        backoff_max_s: float,
        down_after: int,
        open_timeout_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self.health = SensorHealth(name, driver)
        self._make = make
        self._emit = emit
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._down_after = down_after
        self._open_timeout_s = open_timeout_s
        self._rng = rng or random.Random()
        self.sensor: Sensor | None = None

    def _on_reading(self, r: Reading) -> None:
        h = self.health
        h.readings += 1
        h.last_reading_mono = time.monotonic()
        h.last_values[r.quantity] = (r.value, r.unit, r.quality)
        if h.state != "up":
            if h.state == "down":
                log.info("sensor %s is back up", h.name)
            h.state = "up"
            h.consecutive_failures = 0
        self._emit(r)

    async def run(self) -> None:
        h = self.health
        while True:
            readings_before = h.readings
            try:
                if self.sensor is None:
                    self.sensor = self._make()
                sensor = self.sensor
                await within(sensor.open(), self._open_timeout_s)
                await sensor.run(self._on_reading)
                raise RuntimeError("sensor run() returned")
            except asyncio.CancelledError:
                h.state = "stopped"
                await self._close()
                raise
            except Exception as exc:
                await self._close()
                h.failures += 1
                if h.readings > readings_before:
                    h.consecutive_failures = 0
                h.consecutive_failures += 1
                h.last_error = f"{type(exc).__name__}: {exc}"
                h.last_error_wall = time.time()
                h.last_error_mono = time.monotonic()
                h.state = "down" if h.consecutive_failures >= self._down_after else "backoff"
                delay = backoff_delay(h.consecutive_failures - 1, *self._backoff, self._rng)
                h.next_retry_s = round(delay, 3)
                h.next_retry_mono = time.monotonic() + delay
                n = h.consecutive_failures
                # A device that stays away must not flood the journal: warn on the first
                # failures and then at powers of two; the rest go to debug.
                level = logging.WARNING if n <= self._down_after or n & (n - 1) == 0 else \
                    logging.DEBUG
                log.log(level, "sensor %s failed (%s, %d in a row); retry in %.2f s",
                        h.name, h.last_error, n, delay)
                if self.sensor is not None:
                    h.driver_counters = dict(self.sensor.counters)
                await asyncio.sleep(delay)
                h.restarts += 1
                h.next_retry_s = h.next_retry_mono = None

    async def _close(self) -> None:
        if self.sensor is None:
            return
        try:
            await within(asyncio.shield(self.sensor.close()), CLOSE_TIMEOUT_S)
        except Exception as exc:  # a cancellation must pass: the supervisor is being stopped
            log.debug("closing sensor %s: %r", self.health.name, exc)

    def snapshot(self, now_mono: float) -> dict[str, Any]:
        if self.sensor is not None:
            self.health.driver_counters = dict(self.sensor.counters)
        return self.health.snapshot(now_mono)
