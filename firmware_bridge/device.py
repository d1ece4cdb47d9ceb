"""The MCU side of the protocol, as firmware would implement it: one state machine fed with
bytes, writing bytes, driven by timers on the running event loop (no tasks to leak).

What it models besides the messages:

- two flash slots (A, B) and a bootloader: FW_COMMIT marks the other slot for a trial boot; the
  trial image is confirmed once the host acknowledges its boot HELLO (or sends CONNECT to it).
  An image that does not say HELLO within ``trial_timeout_s`` (its header carries NO_BOOT, or
  it is not an image) leaves the MCU hung until the watchdog fires; the bootloader then starts
  the old slot again, which says HELLO with the ROLLED_BACK flag.
- update metadata kept in flash: after a reboot or an unplug the device still reports how much of
  the image it holds without a gap, so the host resumes from there.
- reports queued while no host listens (bounded, oldest dropped and counted) and sent one at a
  time, retransmitted until acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from firmware_bridge import framing
from firmware_bridge.device_update import UpdateReceiver
from firmware_bridge.errors import CrcError, FrameError, MessageError, UpdateError
from firmware_bridge.frames import FLAG_ANSWER, FLAG_RETRY, Frame
from firmware_bridge.image import build_image, parse_header
from firmware_bridge.messages import (
    BY_TYPE,
    NOTICE_TYPES,
    Ack,
    Capability,
    ChannelKind,
    ChannelRecord,
    ConfigGet,
    ConfigKey,
    ConfigSet,
    ConfigValue,
    Connect,
    FwBegin,
    FwChunk,
    Hello,
    HelloFlag,
    Log,
    Message,
    MsgType,
    Nak,
    NakCode,
    Pong,
    Readings,
    Stats,
    Version3,
    decode_message,
)
from firmware_bridge.signals import LoopDetector, PulseCounter

log = logging.getLogger(__name__)

CONFIG_LIMITS: dict[int, tuple[int, int]] = {
    ConfigKey.REPORT_INTERVAL_MS: (10, 60_000),
    ConfigKey.PULSE_MIN_WIDTH_US: (1_000, 100_000),
    ConfigKey.LOOP_HOLD_MS: (0, 2_000),
}
_REPLY_CACHE = 32


@dataclass(frozen=True)
class DeviceSettings:
    channels: tuple[ChannelKind, ...] = (ChannelKind.LOOP, ChannelKind.LOOP, ChannelKind.PULSE,
                                         ChannelKind.PULSE)
    firmware: Version3 = (1, 0, 0)
    seed: int = 1
    versions: tuple[int, int] = (1, 1)  # protocol versions this firmware speaks
    slot_bytes: int = 512 * 1024
    chunk_bytes: int = 1024
    report_interval_s: float = 1.0
    trial_timeout_s: float = 5.0
    boot_delay_s: float = 0.05
    ack_timeout_s: float = 0.25
    backlog: int = 64  # reports kept while no host listens
    clock_ppm: float = 0.0  # crystal error: the MCU clock runs this much fast
    pulses_per_kwh: float = 1000.0
    peak_veh_h: float = 900.0


class DeviceCore:
    def __init__(self, settings: DeviceSettings | None = None,
                 time_fn: Callable[[], float] = time.time, *, day_offset_s: float = 0.0) -> None:
        """``time_fn`` drives the MCU clock and the signals; the signals see
        ``time_fn() + day_offset_s`` as the time of day (give the wall-minus-monotonic offset
        when ``time_fn`` is monotonic)."""
        self.settings = s = settings or DeviceSettings()
        self.time_fn = time_fn
        self.day_offset_s = day_offset_s
        rng = random.Random(s.seed)
        self.uid = bytes(rng.randrange(256) for _ in range(8))
        body = bytes(rng.randrange(256) for _ in range(4096))
        self.slots: list[bytes | None] = [build_image(s.firmware, body), None]
        self.active_slot = 0
        self.trial_slot: int | None = None
        self.running_slot: int | None = None
        self.boot_count = 0
        self.rolled_back = False
        self.running = False
        self.config: dict[int, int] = {
            ConfigKey.REPORT_INTERVAL_MS: round(s.report_interval_s * 1000),
            ConfigKey.PULSE_MIN_WIDTH_US: 30_000,
            ConfigKey.LOOP_HOLD_MS: 0,
        }
        self.counters: dict[str, int] = dict.fromkeys(
            ("rx_frames", "rx_crc_errors", "rx_bad_frames", "tx_frames", "retransmits",
             "duplicates", "reports_dropped"), 0)
        self.receiver = UpdateReceiver(s.slot_bytes, s.chunk_bytes)
        self._write: Callable[[bytes], None] | None = None
        self._deframer = framing.Deframer()
        self._session: int | None = None
        self._replies: OrderedDict[int, bytes] = OrderedDict()
        self._seq = 0
        self._outbox: deque[Message] = deque()
        self._inflight: Frame | None = None
        self._inflight_msg: Message | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._boot_t = 0.0
        self._last_report_t = 0.0
        self._channels: list[LoopDetector | PulseCounter] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- wiring ----------------------------------------------------------------------------

    def start(self) -> None:
        """Power on. Must run inside the event loop that drives the timers."""
        self._loop = asyncio.get_running_loop()
        self._boot()

    def stop(self) -> None:
        """Power off: every timer is cancelled."""
        self.running = False
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def attach(self, write: Callable[[bytes], None]) -> None:
        """A host port appeared (cable plugged in)."""
        self._write = write
        self._deframer.reset()
        self._kick(resend=True)

    def detach(self) -> None:
        """The host port went away: the session ends, queued reports wait."""
        self._write = None
        self._session = None
        self._cancel("retransmit")

    def feed(self, data: bytes) -> None:
        if not self.running:
            return  # in reset or hung: the UART is not serviced
        for body in self._deframer.feed(data):
            self._on_body(body)

    # -- time ------------------------------------------------------------------------------

    def mcu_time_us(self, t: float | None = None) -> int:
        now = self.time_fn() if t is None else t
        return max(0, round((now - self._boot_t) * 1e6 * (1 + self.settings.clock_ppm * 1e-6)))

    def _after(self, name: str, delay_s: float, fn: Callable[[], None]) -> None:
        self._cancel(name)
        assert self._loop is not None, "start() first"
        self._timers[name] = self._loop.call_later(delay_s, fn)

    def _cancel(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    # -- boot, reboot, rollback ------------------------------------------------------------

    def _boot(self) -> None:
        slot = self.trial_slot if self.trial_slot is not None else self.active_slot
        image = self.slots[slot]
        boots = False
        if image is not None:
            try:
                boots = parse_header(image).boots
            except UpdateError:
                boots = False
        if not boots:
            # The image never reaches the point where it talks; the watchdog resets the MCU
            # and the bootloader falls back to the last confirmed slot.
            log.debug("slot %d does not boot; watchdog in %.2f s", slot,
                      self.settings.trial_timeout_s)
            self.running_slot = None
            self._after("watchdog", self.settings.trial_timeout_s, self._watchdog)
            return
        self.running = True
        self.running_slot = slot
        self.boot_count += 1
        self._boot_t = now = self.time_fn()
        self._last_report_t = now
        seed = self.settings.seed * 1000 + self.boot_count
        day = now + self.day_offset_s
        self._channels = [
            LoopDetector(day, peak_veh_h=self.settings.peak_veh_h, seed=seed + i)
            if kind == ChannelKind.LOOP else
            PulseCounter(day, pulses_per_kwh=self.settings.pulses_per_kwh, seed=seed + i)
            for i, kind in enumerate(self.settings.channels)]
        self._outbox.appendleft(self.hello())
        if self.trial_slot is not None:
            self._after("watchdog", self.settings.trial_timeout_s, self._watchdog)
        self._schedule_report()
        self._kick()

    def _watchdog(self) -> None:
        if self.trial_slot is None and self.running:
            return
        log.info("trial image in slot %s did not say HELLO: rolling back to slot %d",
                 self.trial_slot, self.active_slot)
        self.trial_slot = None
        self.reboot(rolled_back=True)

    def _confirm(self) -> None:
        if self.trial_slot is not None and self.running_slot == self.trial_slot:
            self.active_slot = self.trial_slot
            self.trial_slot = None
            self._cancel("watchdog")
            self._notice(20, f"image {self.version_str()} confirmed in slot {self.active_slot}")

    def power_off(self) -> None:
        """Everything in RAM is lost; flash (slots, update progress up to its gap) stays."""
        self.stop()
        self._session = None
        self._replies.clear()
        self._outbox.clear()
        self._inflight = self._inflight_msg = None
        self._deframer.reset()
        self.receiver.power_cycle()

    def reboot(self, *, rolled_back: bool = False) -> None:
        self.power_off()
        self.rolled_back = rolled_back
        self._after("boot", self.settings.boot_delay_s, self._boot)

    # -- identity --------------------------------------------------------------------------

    @property
    def firmware(self) -> Version3:
        slot = self.running_slot if self.running_slot is not None else self.active_slot
        image = self.slots[slot]
        return parse_header(image).version if image is not None else (0, 0, 0)

    def version_str(self) -> str:
        return ".".join(map(str, self.firmware))

    def hello(self) -> Hello:
        caps = Capability.FW_UPDATE | Capability.CONFIG | Capability.LOG | Capability.STATS
        if ChannelKind.LOOP in self.settings.channels:
            caps |= Capability.LOOP
        if ChannelKind.PULSE in self.settings.channels:
            caps |= Capability.PULSE
        flags = HelloFlag(0)
        if self.rolled_back:
            flags |= HelloFlag.ROLLED_BACK
        if self.trial_slot is not None:
            flags |= HelloFlag.TRIAL
        return Hello(self._session or self.settings.versions[0], self.firmware, self.uid, caps,
                     self.mcu_time_us(), self.boot_count, self.running_slot or 0, flags,
                     self.settings.channels)

    # -- reports and outbound requests -----------------------------------------------------

    def _schedule_report(self) -> None:
        self._after("report", self.config[ConfigKey.REPORT_INTERVAL_MS] / 1000, self._report)

    def _report(self) -> None:
        now = self.time_fn()
        interval_us = max(0, self.mcu_time_us(now) - self.mcu_time_us(self._last_report_t))
        scale = 1 + self.settings.clock_ppm * 1e-6
        records = []
        for i, channel in enumerate(self._channels):
            iv = channel.advance(now + self.day_offset_s)
            # One timer measures both on the MCU: occupancy never exceeds the interval.
            records.append(ChannelRecord(i, self.settings.channels[i], iv.count, iv.total,
                                         min(round(iv.occupancy_us * scale), interval_us)))
        self._last_report_t = now
        if len(self._outbox) >= self.settings.backlog:
            self._outbox.popleft()
            self.counters["reports_dropped"] += 1
        self._outbox.append(Readings(self.mcu_time_us(now), interval_us, tuple(records)))
        self._schedule_report()
        self._kick()

    def _kick(self, resend: bool = False) -> None:
        if self._write is None or not self.running:
            return
        if self._inflight is not None:
            # Only a boot HELLO may go out before the host has said CONNECT.
            if resend and (self._session is not None or isinstance(self._inflight_msg, Hello)):
                self._retransmit()
            return
        if not self._outbox:
            return
        head = self._outbox[0]
        if self._session is None and not isinstance(head, Hello):
            return  # reports wait for a host that has said CONNECT
        self._outbox.popleft()
        self._seq = (self._seq + 1) & 0xFF
        self._inflight = Frame(self._version(), head.TYPE, self._seq, head.encode())
        self._inflight_msg = head
        self._send(self._inflight)
        self._after("retransmit", self.settings.ack_timeout_s, self._retransmit)

    def _retransmit(self) -> None:
        frame = self._inflight
        if frame is None or self._write is None:
            return
        self.counters["retransmits"] += 1
        self._send(Frame(frame.version, frame.type, frame.seq, frame.payload, flags=FLAG_RETRY))
        self._after("retransmit", self.settings.ack_timeout_s, self._retransmit)

    def _notice(self, level: int, text: str) -> None:
        if self._session is not None:
            self._seq = (self._seq + 1) & 0xFF
            self._send(Frame(self._version(), Log.TYPE, self._seq,
                             Log(level, self.mcu_time_us(), text).encode()))

    # -- frames in and out -----------------------------------------------------------------

    def _version(self) -> int:
        return self._session or self.settings.versions[0]

    def _send(self, frame: Frame) -> bytes:
        wire = framing.encode(frame.to_bytes())
        if self._write is not None:
            self._write(wire)
            self.counters["tx_frames"] += 1
        return wire

    def _on_body(self, body: bytes) -> None:
        try:
            frame = Frame.from_bytes(body)
        except CrcError:
            self.counters["rx_crc_errors"] += 1
            return
        except FrameError:
            self.counters["rx_bad_frames"] += 1
            return
        self.counters["rx_frames"] += 1
        if frame.is_answer:
            inflight = self._inflight
            if inflight is not None and frame.ack == inflight.seq:
                done = self._inflight_msg
                self._inflight = self._inflight_msg = None
                self._cancel("retransmit")
                if isinstance(done, Hello):
                    self._confirm()
                self._kick()
            return
        if frame.type in NOTICE_TYPES:
            return
        if frame.is_retry and frame.seq in self._replies:
            self.counters["duplicates"] += 1
            if self._write is not None:
                self._write(self._replies[frame.seq])
            return
        answer = self._answer_for(frame)
        wire = self._send(Frame(self._version(), answer.TYPE, self._seq, answer.encode(),
                                ack=frame.seq, flags=FLAG_ANSWER))
        self._replies[frame.seq] = wire
        self._replies.move_to_end(frame.seq)
        while len(self._replies) > _REPLY_CACHE:
            self._replies.popitem(last=False)
        if isinstance(answer, Hello):
            self._kick(resend=True)  # a new session: the report in flight and the queue go

    def _answer_for(self, frame: Frame) -> Message:
        lo, hi = self.settings.versions
        if frame.type != MsgType.CONNECT:
            if self._session is None:
                return Nak(NakCode.NOT_CONNECTED, "send CONNECT first")
            if frame.version != self._session:
                return Nak(NakCode.UNSUPPORTED_VERSION,
                           f"session speaks version {self._session}, frame is {frame.version}")
        try:
            msg = decode_message(frame.type, frame.payload)
        except MessageError as exc:
            code = NakCode.UNKNOWN_TYPE if frame.type not in BY_TYPE else NakCode.BAD_PAYLOAD
            return Nak(code, str(exc))
        if isinstance(msg, Connect):
            common = set(range(lo, hi + 1)) & set(range(msg.min_version, msg.max_version + 1))
            if not common:
                return Nak(NakCode.UNSUPPORTED_VERSION, f"device speaks {lo}..{hi}")
            self._session = max(common)
            self._replies.clear()
            self._confirm()
            return self.hello()
        return self._handle(msg)

    def _handle(self, msg: Message) -> Message:
        match msg.TYPE:
            case MsgType.PING:
                return Pong(self.mcu_time_us())
            case MsgType.STATS_GET:
                c = self.counters
                return Stats(c["rx_frames"], c["rx_crc_errors"], c["rx_bad_frames"],
                             c["tx_frames"], c["retransmits"], c["duplicates"],
                             c["reports_dropped"])
            case MsgType.CONFIG_GET:
                assert isinstance(msg, ConfigGet)
                if msg.key not in self.config:
                    return Nak(NakCode.UNKNOWN_KEY, f"no config key {msg.key}")
                return ConfigValue(msg.key, self.config[msg.key])
            case MsgType.CONFIG_SET:
                assert isinstance(msg, ConfigSet)
                return self._config_set(msg)
            case MsgType.REBOOT:
                self._after("reset", 0.02, self.reboot)
                return Ack()
            case MsgType.FW_BEGIN:
                assert isinstance(msg, FwBegin)
                return self.receiver.begin(msg)
            case MsgType.FW_CHUNK:
                assert isinstance(msg, FwChunk)
                return self.receiver.chunk(msg)
            case MsgType.FW_END:
                return self.receiver.end()
            case MsgType.FW_COMMIT:
                return self._fw_commit()
            case MsgType.FW_ABORT:
                self.receiver.abort()
                return Ack()
            case MsgType.FW_QUERY:
                return self.receiver.status()
        return Nak(NakCode.UNKNOWN_TYPE, f"{msg.TYPE.name} is not a request this device takes")

    def _config_set(self, msg: ConfigSet) -> Message:
        limits = CONFIG_LIMITS.get(msg.key)
        if limits is None:
            return Nak(NakCode.UNKNOWN_KEY, f"no config key {msg.key}")
        if not limits[0] <= msg.value <= limits[1]:
            return Nak(NakCode.INVALID_VALUE,
                       f"key {msg.key}: {msg.value} is outside {limits[0]}..{limits[1]}")
        self.config[msg.key] = msg.value
        if msg.key == ConfigKey.REPORT_INTERVAL_MS:
            self._schedule_report()
        return Ack()

    # -- firmware update -------------------------------------------------------------------

    def _fw_commit(self) -> Message:
        image = self.receiver.take_verified()
        if isinstance(image, Nak):
            return image
        target = 1 - self.active_slot
        self.slots[target] = image
        self.trial_slot = target
        self._after("reset", 0.02, self.reboot)
        return Ack()
