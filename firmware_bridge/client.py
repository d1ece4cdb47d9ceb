"""The bridge API: connect and negotiate, keep the clocks mapped, ask the device things, and
hand its reports to whoever listens.

``BridgeClient.open_serial(port)`` opens a serial port (or pty) and returns a connected client;
``BridgeClient(link)`` wraps a link on any asyncio transport (tests use a lossy fake). Either
way ``await client.connect()`` does the CONNECT/HELLO handshake, starts the background clock
sync and returns the device's HELLO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from drivers.base import DeviceNotReady
from drivers.serial.transport import open_serial_connection
from firmware_bridge.errors import (
    BridgeError,
    LinkDown,
    Rejected,
    RequestTimeout,
    UnsupportedVersion,
)
from firmware_bridge.link import Link, LinkConfig
from firmware_bridge.messages import (
    PROTOCOL_VERSION,
    Ack,
    ConfigGet,
    ConfigSet,
    ConfigValue,
    Connect,
    Hello,
    HelloFlag,
    Log,
    Message,
    NakCode,
    Ping,
    Pong,
    Readings,
    Reboot,
    Stats,
    StatsGet,
)
from firmware_bridge.timesync import ClockMap

log = logging.getLogger(__name__)
device_log = logging.getLogger("firmware_bridge.device_log")

ReadingsListener = Callable[[Readings, int | None], None]
DEFAULT_BAUDRATE = 921_600
HOST_VERSIONS = (PROTOCOL_VERSION, PROTOCOL_VERSION)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    link: LinkConfig = field(default_factory=LinkConfig)
    versions: tuple[int, int] = HOST_VERSIONS
    sync_period_s: float = 10.0  # one PING per period keeps offset and drift current
    sync_burst: int = 4  # PINGs right after CONNECT for a first offset


class BridgeClient:
    def __init__(self, link: Link, config: ClientConfig | None = None) -> None:
        self.link = link
        self.config = config or ClientConfig()
        self.where = link.where
        self.clock = ClockMap()
        self.hello: Hello | None = None
        self.boots_seen = 0
        self._listeners: list[ReadingsListener] = []
        self._boot_waiters: list[asyncio.Future[Hello]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._connecting = False
        self._connected_once = False
        # Applied after every CONNECT: the device keeps its settings in RAM only.
        self.desired_config: dict[int, int] = {}
        self.lost_listeners: list[Callable[[BridgeError], None]] = []
        link.on_request = self._on_device_request
        link.on_notice = self._on_notice
        link.on_lost = self._on_lost

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    async def open_serial(cls, port: str, *, baudrate: int = DEFAULT_BAUDRATE,
                          config: ClientConfig | None = None, open_timeout_s: float = 2.0,
                          mono_ns: Callable[[], int] = time.monotonic_ns) -> Self:
        """Open ``port`` and return a client whose link is up (not yet connected)."""
        cfg = config or ClientConfig()
        link = Link(port, cfg.link, mono_ns=mono_ns)
        try:
            await asyncio.wait_for(open_serial_connection(lambda: link, port, baudrate=baudrate),
                                   open_timeout_s)
        except TimeoutError:
            raise LinkDown(f"opening took longer than {open_timeout_s} s", where=port) from None
        except (DeviceNotReady, OSError, ValueError) as exc:
            raise LinkDown(f"cannot open the port: {exc}", where=port) from exc
        return cls(link, cfg)

    async def aclose(self, timeout_s: float = 2.0) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_boot_waiters(LinkDown("client closed", where=self.where))
        self.link.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.wait_closed(), timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}:{self.where}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- handshake and clock ---------------------------------------------------------------

    async def connect(self) -> Hello:
        """CONNECT with the host's version range; the device answers HELLO in the version it
        chose. Raises UnsupportedVersion if there is none in common."""
        self._connecting = True
        try:
            return await self._connect()
        finally:
            self._connecting = False

    async def _connect(self) -> Hello:
        lo, hi = self.config.versions
        sent = self.link.mono_ns()
        try:
            hello = await self.link.request(Connect(lo, hi), Hello)
        except Rejected as exc:
            if exc.code == NakCode.UNSUPPORTED_VERSION:
                m = re.search(r"(\d+)\.\.(\d+)", exc.detail)
                device = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
                raise UnsupportedVersion(
                    f"device speaks protocol {device[0]}..{device[1]}, this host speaks "
                    f"{lo}..{hi}", where=self.where, device=device, host=(lo, hi)) from None
            raise
        if not lo <= hello.protocol <= hi:
            raise UnsupportedVersion(
                f"device chose protocol {hello.protocol}, this host speaks {lo}..{hi}",
                where=self.where, device=(hello.protocol, hello.protocol), host=(lo, hi))
        self.link.version = hello.protocol
        self.clock.add(sent, self.link.mono_ns(), hello.mcu_time_us)
        self.hello = hello
        for _ in range(self.config.sync_burst):
            await self.ping()
        for key, value in self.desired_config.items():
            await self.set_config(key, value)
        self._connected_once = True
        self._ready.set()
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = self._spawn(self._sync_loop(), "bridge-clock-sync")
        return hello

    async def wait_ready(self, timeout_s: float) -> Hello:
        """Until a session is up (after a device reboot the client reconnects by itself)."""
        async with asyncio.timeout(timeout_s):
            await self._ready.wait()
        if not self.link.is_up:
            raise self.link.down_reason or LinkDown("link down", where=self.where)
        assert self.hello is not None
        return self.hello

    async def ping(self) -> float:
        """Round-trip time in seconds; each answer also refines the clock mapping."""
        sent = self.link.mono_ns()
        pong = await self.link.request(Ping(), Pong)
        received = self.link.mono_ns()
        self.clock.add(sent, received, pong.mcu_time_us)
        return (received - sent) / 1e9

    async def _sync_loop(self) -> None:
        while self.link.is_up:
            await asyncio.sleep(self.config.sync_period_s)
            try:
                await self.ping()
            except RequestTimeout as exc:
                log.debug("%s: clock sync ping: %s", self.where, exc)
            except BridgeError:
                return

    def device_uptime_s(self) -> float | None:
        """Seconds since the device booted, by the mapped clock."""
        offset = self.clock.offset_ns
        return None if offset is None else (self.link.mono_ns() - offset) / 1e9

    # -- requests --------------------------------------------------------------------------

    async def stats(self) -> Stats:
        return await self.link.request(StatsGet(), Stats)

    async def get_config(self, key: int) -> int:
        return (await self.link.request(ConfigGet(key), ConfigValue)).value

    async def set_config(self, key: int, value: int) -> None:
        await self.link.request(ConfigSet(key, value), Ack)

    async def reboot(self) -> None:
        self._ready.clear()
        await self.link.request(Reboot(), Ack)

    async def wait_boot(self, timeout_s: float) -> Hello:
        """The next HELLO the device sends on its own, i.e. after it (re)booted."""
        if self.link.down_reason is not None:
            raise self.link.down_reason
        fut: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self._boot_waiters.append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            if fut in self._boot_waiters:
                self._boot_waiters.remove(fut)

    def link_stats(self) -> dict[str, float]:
        out = self.link.stats()
        if self.clock.samples:
            out["clock_samples"] = float(self.clock.samples)
            out["clock_drift_ppm"] = self.clock.drift_ppm
            best = self.clock.best_rtt_ns
            if best is not None:
                out["clock_best_rtt_s"] = best / 1e9
        return out

    # -- what the device sends on its own --------------------------------------------------

    def add_listener(self, listener: ReadingsListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ReadingsListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _on_device_request(self, msg: Message) -> Message | None:
        if isinstance(msg, Readings):
            mono = self.clock.to_host_ns(msg.mcu_time_us)
            for listener in list(self._listeners):
                try:
                    listener(msg, mono)
                except Exception:
                    log.exception("%s: readings listener failed", self.where)
            return None
        if isinstance(msg, Hello):
            self._on_boot(msg)
            return None
        return None

    def _on_boot(self, hello: Hello) -> None:
        log.info("%s: device booted firmware %s (boot %d, slot %d%s)", self.where,
                 ".".join(map(str, hello.firmware)), hello.boot_count, hello.active_slot,
                 ", rolled back" if hello.flags & HelloFlag.ROLLED_BACK else "")
        self.boots_seen += 1
        known = self.hello
        if known is not None and hello.boot_count == known.boot_count:
            return  # the announce of the boot this session already knows (sent before CONNECT)
        self.hello = hello
        self.link.forget_peer()
        self.clock.reset()
        for fut in self._boot_waiters:
            if not fut.done():
                fut.set_result(hello)
        if self._connecting or not self._connected_once:
            return  # the CONNECT under way (or the caller's first one) opens the session
        # The device forgot the session: connect again, outside this protocol callback.
        self._ready.clear()
        self._spawn(self._reconnect(), "bridge-reconnect")

    async def _reconnect(self) -> None:
        try:
            await self.connect()
        except BridgeError as exc:
            log.warning("%s: reconnecting after a device reboot failed: %s", self.where, exc)

    def _on_notice(self, msg: Message) -> None:
        if isinstance(msg, Log):
            device_log.log(msg.level if 0 < msg.level <= 50 else 20, "%s: %s", self.where,
                           msg.text)

    def _on_lost(self, exc: BridgeError) -> None:
        self._fail_boot_waiters(exc)
        self._ready.set()  # wake wait_ready, which then reports the link down
        for listener in list(self.lost_listeners):
            try:
                listener(exc)
            except Exception:
                log.exception("%s: lost listener failed", self.where)

    def _fail_boot_waiters(self, exc: BaseException) -> None:
        for fut in self._boot_waiters:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
