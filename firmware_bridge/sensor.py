"""The ``bridge`` driver: one channel of the sensor MCU as an agent sensor.

Config (``[[sensors]]`` with ``driver = "bridge"``)::

    port      serial path (/dev/serial/by-id/...) or "emulated"
    period_s  report interval asked of the MCU (the shortest of the sensors on one port wins)
    timeout_s per-request timeout; no report for max(3 x period_s, timeout_s) means "not ready"
    options.channel         MCU channel number (required)
    options.kind            "loop" or "pulse" (optional; checked against the device's HELLO)
    options.pulses_per_kwh  meter constant for pulse channels (default 1000)
    options.baudrate        UART speed (default 921600; ignored by USB-CDC)
    options.board           the board id a signed firmware image must name (`firmware.flash`)
    options.emulator        for port = "emulated": a table with channels (list of "loop" /
                            "pulse"), seed, peak_veh_h, pulses_per_kwh, firmware ("1.0.0")

Readings (CHANNELS.md): a loop channel gives ``occupancy`` (1, fraction of the interval) and
``vehicle_count`` (count); a pulse channel gives ``pulses`` (count) and ``energy`` (Wh), each
stamped with the end of the MCU's report interval mapped to host time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.clock import Clock
from agent.quality import CLOCK_UNSYNCED, OUT_OF_RANGE
from agent.readings import Quality, Reading
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady, Emit, Sensor
from firmware_bridge.client import DEFAULT_BAUDRATE, ClientConfig
from firmware_bridge.device import DeviceSettings
from firmware_bridge.emulator import BridgeEmulator
from firmware_bridge.errors import BridgeError
from firmware_bridge.hub import BridgeHub, ChannelReport
from firmware_bridge.image import parse_version
from firmware_bridge.link import LinkConfig
from firmware_bridge.messages import ChannelKind

EMULATED = "emulated"
_KINDS = {"loop": ChannelKind.LOOP, "pulse": ChannelKind.PULSE}


class BridgeSensor(Sensor):
    def __init__(self, name: str, clock: Clock, hub: BridgeHub, *, channel: int,
                 kind: ChannelKind | None, pulses_per_kwh: float, period_s: float,
                 timeout_s: float) -> None:
        super().__init__(name, clock)
        self.hub = hub
        self.channel = channel
        self.kind = kind
        self.pulses_per_kwh = pulses_per_kwh
        self.stale_s = max(3 * period_s, timeout_s)
        self.where = f"{hub.port}#{channel}"

    async def open(self) -> None:
        client = await self.hub.acquire()
        hello = client.hello
        assert hello is not None
        if self.channel >= len(hello.channels):
            raise ConfigurationError(f"the device has {len(hello.channels)} channels (0.."
                                     f"{len(hello.channels) - 1})", where=self.where)
        actual = hello.channels[self.channel]
        if self.kind is not None and actual != self.kind:
            raise ConfigurationError(f"channel is a {actual.name.lower()} input, configured as "
                                     f"{self.kind.name.lower()}", where=self.where)
        self.kind = actual

    async def run(self, emit: Emit) -> None:
        if self.kind is None:
            await self.open()
        queue = self.hub.subscribe(self.channel)
        try:
            client = await self.hub.acquire()
            if not client.link.is_up:
                raise DeviceNotReady("link down", where=self.where)
            while True:
                try:
                    async with asyncio.timeout(self.stale_s):  # wait_for may swallow cancel
                        item = await queue.get()
                except TimeoutError:
                    self.count("stale")
                    raise DeviceNotReady(f"no report for {self.stale_s:.1f} s",
                                         where=self.where) from None
                if isinstance(item, BridgeError):
                    raise item
                for reading in self.readings(item):
                    emit(reading)
        finally:
            self.hub.unsubscribe(self.channel, queue)

    def readings(self, report: ChannelReport) -> list[Reading]:
        """The Readings of one channel report (pure apart from the clock)."""
        rec = report.record
        now_mono = self.clock.mono_ns()
        reasons: tuple[str, ...] = ()
        mono = report.mono_ns
        if mono is None:
            mono, reasons = now_mono, (CLOCK_UNSYNCED,)
        ts = self.clock.wall_ns() - (now_mono - mono)
        quality: Quality = "suspect" if reasons else "good"
        if rec.kind == ChannelKind.LOOP:
            occ = rec.occupancy_us / report.interval_us if report.interval_us > 0 else 0.0
            occ_reasons = reasons
            occ_quality: Quality = quality
            if not 0.0 <= occ <= 1.0:
                self.count("occupancy_out_of_range")
                occ, occ_reasons = min(max(occ, 0.0), 1.0), (*reasons, OUT_OF_RANGE)
                occ_quality = "suspect"
            return [
                Reading(self.name, "occupancy", occ, "1", ts, mono,
                        occ_quality, occ_reasons),
                Reading(self.name, "vehicle_count", float(rec.count), "count", ts, mono,
                        quality, reasons),
            ]
        return [
            Reading(self.name, "pulses", float(rec.count), "count", ts, mono, quality, reasons),
            Reading(self.name, "energy", rec.count * 1000.0 / self.pulses_per_kwh, "Wh", ts,
                    mono, quality, reasons),
        ]


def _emulator_settings(raw: Any, where: str) -> DeviceSettings:
    if raw is None:
        return DeviceSettings()
    if not isinstance(raw, dict):
        raise ConfigurationError("options.emulator must be a table", where=where)
    kw: dict[str, Any] = {}
    try:
        if "channels" in raw:
            kw["channels"] = tuple(_KINDS[str(k)] for k in raw["channels"])
        for key in ("seed",):
            if key in raw:
                kw[key] = int(raw[key])
        for key in ("peak_veh_h", "pulses_per_kwh", "clock_ppm", "trial_timeout_s"):
            if key in raw:
                kw[key] = float(raw[key])
        if "firmware" in raw:
            kw["firmware"] = parse_version(str(raw["firmware"]))
    except KeyError as exc:
        raise ConfigurationError(f"options.emulator.channels: {exc} is not loop or pulse",
                                 where=where) from None
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"options.emulator: {exc}", where=where) from None
    unknown = set(raw) - {"channels", "seed", "peak_veh_h", "pulses_per_kwh", "clock_ppm",
                          "trial_timeout_s", "firmware"}
    if unknown:
        raise ConfigurationError(f"options.emulator: unknown keys {sorted(unknown)}", where=where)
    return DeviceSettings(**kw)


def hub_key(port: str) -> str:
    """Where a port's hub is kept in ``BuildContext.shared``."""
    return f"firmware_bridge:{port}"


def running_hub(shared: dict[str, Any], port: str) -> BridgeHub | None:
    """The hub the running sensors on ``port`` share, if they were built."""
    hub = shared.get(hub_key(port))
    return hub if isinstance(hub, BridgeHub) else None


def _hub(cfg: Any, ctx: BuildContext, options: dict[str, Any]) -> BridgeHub:
    port = str(cfg.port)
    key = hub_key(port)
    hub = ctx.shared.get(key)
    if isinstance(hub, BridgeHub):
        return hub
    emulator = None
    if port == EMULATED:
        settings = _emulator_settings(options.get("emulator"), f"bridge:{cfg.name}")
        clock = ctx.clock
        emulator = BridgeEmulator(settings=settings, time_fn=lambda: clock.mono_ns() / 1e9,
                                  day_offset_s=(clock.wall_ns() - clock.mono_ns()) / 1e9)
        ctx.shared["firmware_bridge:emulator"] = emulator
        ctx.stack.push_async_callback(emulator.close)
    timeout_s = float(cfg.timeout_s)
    link = LinkConfig(ack_timeout_s=min(1.6, timeout_s),
                      ack_timeout_max_s=max(3.2, timeout_s))
    hub = BridgeHub(port, baudrate=int(options.get("baudrate", DEFAULT_BAUDRATE)),
                    timeout_s=timeout_s, mono_ns=ctx.clock.mono_ns, emulator=emulator,
                    config=ClientConfig(link=link))
    ctx.shared[key] = hub
    # Registered after the emulator's close, so the link closes before the device goes away.
    ctx.stack.push_async_callback(hub.aclose)
    return hub


def build(cfg: Any, ctx: BuildContext) -> BridgeSensor:
    where = f"bridge:{cfg.name}"
    options = dict(cfg.options)
    if not cfg.port:
        raise ConfigurationError("a port is required (a serial path or \"emulated\")", where=where)
    if "channel" not in options:
        raise ConfigurationError("options.channel is required (the MCU channel number)",
                                 where=where)
    try:
        channel = int(options["channel"])
        pulses_per_kwh = float(options.get("pulses_per_kwh", 1000.0))
        kind_name = options.get("kind")
        kind = _KINDS[str(kind_name)] if kind_name is not None else None
    except KeyError:
        raise ConfigurationError(f"options.kind {options.get('kind')!r} is not loop or pulse",
                                 where=where) from None
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"bad option: {exc}", where=where) from None
    if not 0 <= channel <= 255:
        raise ConfigurationError(f"options.channel {channel} is outside 0..255", where=where)
    if pulses_per_kwh <= 0:
        raise ConfigurationError(f"options.pulses_per_kwh {pulses_per_kwh} must be > 0",
                                 where=where)
    hub = _hub(cfg, ctx, options)
    hub.want_interval(float(cfg.period_s))
    return BridgeSensor(cfg.name, ctx.clock, hub, channel=channel, kind=kind,
                        pulses_per_kwh=pulses_per_kwh, period_s=float(cfg.period_s),
                        timeout_s=float(cfg.timeout_s))
