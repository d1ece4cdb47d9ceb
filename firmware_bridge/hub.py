"""One connection per bridge port, shared by every sensor configured on it.

Sensors on the same MCU (a loop detector on channel 0, a meter on channel 2, ...) are separate
sensors for the agent but share one link: the hub opens it on first use, hands each sensor the
reports of its channel through a bounded queue, and when the link goes down puts the error in
every queue so that each sensor raises and the supervisor reconnects through the hub again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from firmware_bridge.client import BridgeClient, ClientConfig
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.errors import BridgeError, LinkDown
from firmware_bridge.messages import ChannelRecord, ConfigKey, Readings

log = logging.getLogger(__name__)

QUEUE_REPORTS = 64  # per channel; a sensor that falls further behind loses the oldest


@dataclass(frozen=True, slots=True)
class ChannelReport:
    record: ChannelRecord
    interval_us: int
    mono_ns: int | None  # end of the interval on the host monotonic clock; None before sync


Item = ChannelReport | BridgeError


class BridgeHub:
    def __init__(self, port: str, *, baudrate: int, timeout_s: float,
                 mono_ns: Callable[[], int], emulator: BridgeEmulator | None = None,
                 config: ClientConfig | None = None) -> None:
        self.port = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self.mono_ns = mono_ns
        self.emulator = emulator
        self.config = config or ClientConfig()
        self.report_interval_ms: int | None = None
        self.counters: dict[str, int] = {"connects": 0, "queue_overflows": 0}
        self._client: BridgeClient | None = None
        self._lock = asyncio.Lock()
        self._queues: dict[int, list[asyncio.Queue[Item]]] = {}

    def want_interval(self, period_s: float) -> None:
        """The MCU reports at the shortest period any sensor on this port asks for."""
        ms = max(10, round(period_s * 1000))
        if self.report_interval_ms is None or ms < self.report_interval_ms:
            self.report_interval_ms = ms

    @property
    def device_port(self) -> str:
        return self.emulator.port if self.emulator is not None else self.port

    async def acquire(self) -> BridgeClient:
        """The connected client, opening and handshaking if the link is not up."""
        async with self._lock:
            client = self._client
            if client is not None and client.link.is_up:
                return client
            self._client = None
            if client is not None:
                await client.aclose()
            if self.emulator is not None:
                await self.emulator.start()
            client = await BridgeClient.open_serial(self.device_port, baudrate=self.baudrate,
                                                    config=self.config,
                                                    open_timeout_s=self.timeout_s,
                                                    mono_ns=self.mono_ns)
            if self.report_interval_ms is not None:
                client.desired_config[ConfigKey.REPORT_INTERVAL_MS] = self.report_interval_ms
            client.add_listener(self._dispatch)
            client.lost_listeners.append(self._lost)
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    await client.connect()
            except TimeoutError:
                await client.aclose()
                raise LinkDown(f"no handshake within {self.timeout_s * 4} s",
                               where=self.device_port) from None
            except BaseException:
                await client.aclose()
                raise
            self.counters["connects"] += 1
            self._client = client
            return client

    def subscribe(self, channel: int) -> asyncio.Queue[Item]:
        q: asyncio.Queue[Item] = asyncio.Queue(QUEUE_REPORTS)
        self._queues.setdefault(channel, []).append(q)
        return q

    def unsubscribe(self, channel: int, q: asyncio.Queue[Item]) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._queues[channel].remove(q)

    def _put(self, q: asyncio.Queue[Item], item: Item) -> None:
        if q.full():
            q.get_nowait()
            self.counters["queue_overflows"] += 1
        q.put_nowait(item)

    def _dispatch(self, readings: Readings, mono_ns: int | None) -> None:
        for record in readings.records:
            for q in self._queues.get(record.channel, ()):
                self._put(q, ChannelReport(record, readings.interval_us, mono_ns))

    def _lost(self, exc: BridgeError) -> None:
        for queues in self._queues.values():
            for q in queues:
                self._put(q, exc)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
