"""Fixed wall-clock windows per stream: running aggregates, fusion and derived values.

A window of a stream with ``window_s = W`` covers ``[start, start + W)`` with
``start = floor(ts / W) * W`` (UTC ns), so windows of every gateway line up. Each reading is
routed to every stream that lists its sensor and added to running sums in the window's
per-channel accumulator: nothing per reading is kept, and the mean, min, max, last and sample
std (ddof 1) come out when the window closes. Only usable values are aggregated (good, or
suspect only about their timestamp, see ``agent.pipeline.filters.value_usable``); suspect and bad
readings are counted.

Closing: ``close_due(now, grace)`` closes the windows whose ``end + grace`` has passed. A reading
for a window that is already closed is *late*: it is counted and dropped, not moved into the
current window, because its value belongs to a time that has been published and would distort
the current window's statistics. At most ``max_open`` windows are open per stream; a reading
that needs one more closes the oldest early (flag ``partial``), which bounds memory whatever
the timestamps. Re-stamped readings are placed in time order, so a window they close that way
ends before the reading that needed room: it is complete and not flagged ``partial``.

Energy: the trapezoid between two power samples is split at window boundaries and each window
gets exactly its own part. So that the part after a window's last sample reaches it, a window
stays open past ``end + grace`` until the power channels' next sample arrives, at most until the
gap limit (``GAP_PERIODS`` sensor periods) after their last one, beyond which no trapezoid is
bridged: windows of a power stream are published at most one gap limit late, each once.

Clock: readings flagged ``clock_unsynced`` are held back (at most ``hold_s`` and ``hold_max``
readings) instead of going into windows keyed on a wall clock that is about to move. When the
clock syncs they are re-stamped from their monotonic time (``restamp``) and windowed with the
flag ``restamped``. While readings are held, the windows they belong to stay open. Readings
that outstay the hold are windowed on their provisional time (monotonic plus the last known
offset) under the flag ``clock_unsynced``; at the sync, provisional windows still open are
finished (``partial``) and windows on true time may open again after the last window closed on
synced time, so a start may be published twice, once under each flag.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Final

from agent.clock import Clock
from agent.config.cleaning import resolve
from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.clocksync import ClockSync
from agent.pipeline.clocksync import restamp as restamp_reading
from agent.pipeline.derived import DRIVER_QUANTITIES, NS_PER_HOUR, POWER, PowerIntegral, derive
from agent.pipeline.drift import DriftMonitor
from agent.pipeline.filters import value_usable
from agent.pipeline.fuse import Member, fuse
from agent.pipeline.window_state import ChannelAcc, OpenWindow, PowerCarry
from agent.quality import CLOCK_UNSYNCED, PARTIAL, RESTAMPED
from agent.readings import ChannelStats, Reading, Window

log = logging.getLogger(__name__)

DEFAULT_MAX_OPEN: Final = 4
DEFAULT_HOLD_S: Final = 300.0
DEFAULT_HOLD_MAX: Final = 50_000
GAP_PERIODS: Final = 3  # power samples further apart than this many periods are not bridged


class _Stream:
    """The open windows of one stream."""

    def __init__(self, cfg: StreamConfig, sensors: dict[str, SensorConfig],
                 groups: list[tuple[str, list[Member]]], max_open: int) -> None:
        self.name = cfg.name
        self.window_s = cfg.window_s
        self.window_ns = round(cfg.window_s * 1e9)
        self.groups = groups
        self.monitors = {name: DriftMonitor(name, members) for name, members in groups}
        self.max_open = max_open
        self.open: dict[int, OpenWindow] = {}
        self.cur: OpenWindow | None = None
        self.ready: list[tuple[OpenWindow, str | None]] = []  # closed early, for the next close_due
        self.replaying = False  # re-stamped readings are being placed in time order
        self.closed_end: int | None = None  # every window ending by here is closed
        self.synced_end: int | None = None  # the same, counting only windows on synced time
        self.late = 0
        self.forced = 0
        self.max_gap_ns = {n: round(GAP_PERIODS * sensors[n].period_s * 1e9) for n in cfg.sensors}
        self.carry: dict[str, dict[str, PowerCarry]] = {}
        self.quantities: set[str] = set()
        for n in cfg.sensors:
            self.quantities |= DRIVER_QUANTITIES.get(sensors[n].driver, frozenset())

    def add(self, r: Reading) -> None:
        ts = r.ts_ns
        w = self.cur
        if w is None or ts < w.start or ts >= w.end:
            w = self._window_for(ts)
            if w is None:
                return
            self.cur = w
        by_q = w.chans.get(r.sensor)
        if by_q is None:
            by_q = w.chans[r.sensor] = {}
        acc = by_q.get(r.quantity)
        if acc is None:
            acc = by_q[r.quantity] = ChannelAcc(r.unit)
            self.quantities.add(r.quantity)
        reasons = r.reasons
        if reasons:
            if CLOCK_UNSYNCED in reasons:
                w.flags.add(CLOCK_UNSYNCED)
            if RESTAMPED in reasons:
                w.flags.add(RESTAMPED)
        quality = r.quality
        if quality == "good" or value_usable(quality, reasons):
            if acc.n == 0:
                acc.unit = r.unit
            acc.add(r.value, ts)
            if r.quantity in POWER:
                self._integrate(w, acc, r)
        elif quality == "bad":
            acc.bad += 1
        else:
            acc.suspect += 1

    def _window_for(self, ts: int) -> OpenWindow | None:
        start = ts - ts % self.window_ns
        w = self.open.get(start)
        if w is not None:
            return w
        if self.closed_end is not None and start < self.closed_end:
            self.late += 1
            return None
        if len(self.open) >= self.max_open:
            oldest = min(self.open)
            if start < oldest:
                self.late += 1
                return None
            self.forced += 1
            old = self.open.pop(oldest)
            # Replayed in time order, a window that ends before this reading has all of its
            # readings: complete, not partial (unless a power sample may still cross its end).
            complete = (self.replaying and old.end <= ts
                        and not (self.carry and self._awaits_power(old, ts, 0)))
            self.ready.append((self._close(old), None if complete else PARTIAL))
        w = self.open[start] = OpenWindow(start, start + self.window_ns)
        return w

    def _integrate(self, w: OpenWindow, acc: ChannelAcc, r: Reading) -> None:
        sensor, quantity, ts, v = r.sensor, r.quantity, r.ts_ns, r.value
        by_q = self.carry.get(sensor)
        if by_q is None:
            by_q = self.carry[sensor] = {}
        c = by_q.get(quantity)
        if c is None:
            by_q[quantity] = PowerCarry(ts, v)
            return
        t0, v0 = c.t, c.v
        if ts <= t0:
            return  # out of order: the trapezoid to it was already taken
        c.t = ts
        c.v = v
        dt = ts - t0
        if dt > self.max_gap_ns[sensor]:
            return  # a gap: not bridged
        if t0 >= w.start:
            acc.area += (v0 + v) * 0.5 * dt
            acc.covered += dt
            return
        # The trapezoid crosses into this window: each window gets exactly its own part. Earlier
        # windows are still open (``_awaits_power`` holds them for this sample); a window with
        # no reading of its own under the trapezoid is opened for its part. A part whose window
        # is already closed is not credited anywhere else: a published window is final.
        slope = (v - v0) / dt
        vb = v0 + slope * (w.start - t0)
        acc.area += (vb + v) * 0.5 * (ts - w.start)
        acc.covered += ts - w.start
        ws = t0 - t0 % self.window_ns
        while ws < w.start:
            earlier = self.open.get(ws)
            if earlier is None and (self.closed_end is None or ws >= self.closed_end) \
                    and len(self.open) < self.max_open:
                earlier = self.open[ws] = OpenWindow(ws, ws + self.window_ns)
            if earlier is not None:
                eq = earlier.chans.get(sensor)
                if eq is None:
                    eq = earlier.chans[sensor] = {}
                target = eq.get(quantity)
                if target is None:
                    target = eq[quantity] = ChannelAcc(r.unit)
                a = max(t0, ws)
                b = min(ws + self.window_ns, w.start)
                target.area += (2.0 * v0 + slope * (a - t0 + b - t0)) * 0.5 * (b - a)
                target.covered += b - a
            ws += self.window_ns

    def _awaits_power(self, w: OpenWindow, now_ns: int, grace_ns: int) -> bool:
        """Whether ``w`` must stay open for the next sample of a power channel: the trapezoid to
        it may cross ``w``'s end, and its part in ``w`` belongs to ``w``. The wait is bounded
        by the gap limit: a sample further away would not be bridged anyway."""
        for sensor, by_q in self.carry.items():
            gap = self.max_gap_ns[sensor]
            for c in by_q.values():
                if w.start - gap < c.t < w.end and now_ns < c.t + gap + grace_ns:
                    return True
        return False

    def _close(self, w: OpenWindow) -> OpenWindow:
        if self.closed_end is None or w.end > self.closed_end:
            self.closed_end = w.end
        if CLOCK_UNSYNCED not in w.flags and (self.synced_end is None
                                              or w.end > self.synced_end):
            self.synced_end = w.end
        if self.cur is w:
            self.cur = None
        return w

    def settle(self, upto_ns: int) -> None:
        """Close, as complete, the windows ending by ``upto_ns`` after a time-ordered replay."""
        for s in sorted(self.open):
            w = self.open[s]
            if w.end > upto_ns or (self.carry and self._awaits_power(w, upto_ns, 0)):
                break
            self.ready.append((self._close(self.open.pop(s)), None))

    def close_due(self, now_ns: int, grace_ns: int) -> list[Window]:
        out = [self._finish(w, extra) for w, extra in self.ready]
        self.ready.clear()
        if self.open:
            due = sorted(s for s, w in self.open.items() if w.end + grace_ns <= now_ns)
            for s in due:
                # In order: a window held for a power sample holds the later ones too, or
                # closing them would make its readings late.
                if self.carry and self._awaits_power(self.open[s], now_ns, grace_ns):
                    break
                w = self.open.pop(s)
                self._close(w)
                out.append(self._finish(w, None))
        return out

    def flush(self) -> list[Window]:
        out = [self._finish(w, extra) for w, extra in self.ready]
        self.ready.clear()
        for s in sorted(self.open):
            w = self.open.pop(s)
            self._close(w)
            out.append(self._finish(w, PARTIAL))
        return out

    def resync(self) -> None:
        """The clock synced: windows on provisional time are finished, and windows at or after
        the last window on synced time may open again."""
        for s in sorted(self.open):
            if CLOCK_UNSYNCED in self.open[s].flags:
                self.ready.append((self._close(self.open.pop(s)), PARTIAL))
        self.closed_end = self.synced_end

    def _finish(self, w: OpenWindow, extra: str | None) -> Window:
        channels: dict[str, ChannelStats] = {}
        integrals: dict[str, PowerIntegral] = {}
        for sensor, by_q in w.chans.items():
            for quantity, acc in by_q.items():
                name = f"{sensor}.{quantity}"
                channels[name] = acc.stats()
                if acc.covered:
                    integrals[name] = PowerIntegral(acc.area / NS_PER_HOUR, acc.covered / 1e9)
        flags = sorted(w.flags)
        if extra is not None:
            flags.append(extra)
        fused: dict[str, ChannelStats] = {}
        for name, members in self.groups:
            if any(m.channel in channels for m in members):
                verdict = self.monitors[name].update(channels)
                result = fuse(name, members, channels, inflate=verdict.inflate,
                              exclude=verdict.exclude)
                fused[name] = result.stats
                flags.extend(verdict.flags)
                flags.extend(result.flags)
        derived = derive(self.window_s, channels, integrals, self.quantities)
        return Window(self.name, w.start, w.end, channels, fused, derived, tuple(flags))


def _fuse_groups(stream: StreamConfig,
                 sensors: dict[str, SensorConfig]) -> list[tuple[str, list[Member]]]:
    out = []
    for g in stream.fuse:
        where = f"stream {stream.name!r}, fuse group {g.name!r}"
        members: list[Member] = []
        quantities: set[str] = set()
        for ch in g.channels:
            sensor, dot, quantity = ch.partition(".")
            if not dot or not sensor or not quantity:
                raise ValueError(f"{where}: {ch!r} is not a channel name (sensor.quantity)")
            if sensor not in stream.sensors:
                raise ValueError(f"{where}: {ch!r} names sensor {sensor!r}, which the stream "
                                 f"does not list")
            if any(m.channel == ch for m in members):
                raise ValueError(f"{where}: {ch!r} is listed twice")
            cfg = sensors[sensor]
            policy = resolve(quantity, cfg.period_s, cfg.clean.get(quantity))
            members.append(Member(ch, policy.fuse_sigma))
            quantities.add(quantity)
        if len(quantities) > 1:
            raise ValueError(f"{where}: mixes quantities {', '.join(sorted(quantities))}; "
                             "fusion combines sensors of one quantity")
        out.append((g.name, members))
    return out


class Windower:
    """Routes cleaned readings into the windows of every stream that lists their sensor.

    Held readings are re-stamped when the first reading stamped on a synced clock arrives, or
    when ``close_due`` finds ``clock`` (if given) synced, whichever comes first. The new offset
    is the clock's, or without a clock that of the synced reading (``ts_ns - mono_ns``).
    """

    def __init__(
        self,
        streams: Sequence[StreamConfig],
        sensors: Sequence[SensorConfig],
        *,
        clock: Clock | None = None,
        max_open: int = DEFAULT_MAX_OPEN,
        hold_s: float = DEFAULT_HOLD_S,
        hold_max: int = DEFAULT_HOLD_MAX,
    ) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        by_name = {s.name: s for s in sensors}
        self._streams: list[_Stream] = []
        self._routes: dict[str, list[_Stream]] = {}
        self._raw: dict[str, list[str]] = {}
        for st in streams:
            for sensor in st.sensors:
                if sensor not in by_name:
                    raise ValueError(f"stream {st.name!r}: no sensor named {sensor!r}")
            stream = _Stream(st, by_name, _fuse_groups(st, by_name), max_open)
            self._streams.append(stream)
            for sensor in dict.fromkeys(st.sensors):
                self._routes.setdefault(sensor, []).append(stream)
                if st.raw:
                    self._raw.setdefault(sensor, []).append(st.name)
        self._clock = clock
        self._hold_ns = round(hold_s * 1e9)
        self._hold_max = hold_max
        self._held: deque[Reading] = deque()
        self._unsynced_seen = False
        self._no_streams: list[str] = []
        self.unrouted = 0
        self.restamped = 0

    def raw_streams_for(self, sensor: str) -> list[str]:
        """Streams that list ``sensor`` and publish cleaned readings (``share = "raw"`` on the
        stream or one of its audiences); a shared list: do not modify."""
        return self._raw.get(sensor, self._no_streams)

    def add(self, r: Reading) -> None:
        reasons = r.reasons
        if reasons and CLOCK_UNSYNCED in reasons:
            self._unsynced_seen = True
            if self._hold_ns > 0 and self._hold_max > 0:
                self._held.append(r)
                if len(self._held) > self._hold_max:
                    self._place(self._held.popleft())
                return
        elif self._unsynced_seen:
            # The first reading on a synced clock: re-stamp what is held before it, so windows
            # on true time open before this reading needs one.
            self.restamp(_offset(self._clock) if self._clock is not None
                         else r.ts_ns - r.mono_ns)
        self._place(r)

    def _place(self, r: Reading) -> None:
        streams = self._routes.get(r.sensor)
        if streams is None:
            self.unrouted += 1
            return
        for s in streams:
            s.add(r)

    def close_due(self, now_wall_ns: int, grace_ns: int) -> list[Window]:
        """Windows whose ``end + grace_ns`` has passed, oldest first."""
        if self._unsynced_seen and self._clock is not None and self._clock.synced():
            self.restamp(_offset(self._clock))
        held = self._held
        if held:
            cutoff = now_wall_ns - self._hold_ns
            while held and held[0].ts_ns <= cutoff:
                self._place(held.popleft())
            if held:
                # Windows the held readings still belong to must stay open for them.
                now_wall_ns = min(now_wall_ns, held[0].ts_ns - grace_ns)
        out: list[Window] = []
        for s in self._streams:
            out.extend(s.close_due(now_wall_ns, grace_ns))
        if len(out) > 1:
            out.sort(key=_order)
        return out

    def flush(self) -> list[Window]:
        """Every open window (flag ``partial``), held readings included: for shutdown."""
        while self._held:
            self._place(self._held.popleft())
        out: list[Window] = []
        for s in self._streams:
            out.extend(s.flush())
        out.sort(key=_order)
        return out

    def restamp(self, offset_ns: int) -> list[Reading]:
        """The clock is synced and wall = mono + ``offset_ns``: re-stamp and window the held
        readings. Returns them re-stamped (e.g. for raw streams to publish again)."""
        out = [restamp_reading(r, offset_ns) for r in self._held]
        self._held.clear()
        self._unsynced_seen = False
        # In time order, so that windows the replay has passed are known to be complete.
        out.sort(key=_stamp)
        for s in self._streams:
            s.resync()
            s.replaying = True
        try:
            for r in out:
                self._place(r)
        finally:
            for s in self._streams:
                s.replaying = False
        if out:
            # Readings from now on are newer than the replay: windows it has passed are
            # complete, and must not wait to be closed early (``partial``) by the next reading.
            for s in self._streams:
                s.settle(out[-1].ts_ns)
        self.restamped += len(out)
        if out:
            log.info("re-stamped %d readings held while the clock was not synchronised", len(out))
        return out

    def stats(self) -> dict[str, object]:
        return {
            "late": {s.name: s.late for s in self._streams},
            "closed_early": {s.name: s.forced for s in self._streams},
            "open": {s.name: len(s.open) for s in self._streams},
            "held": len(self._held),
            "restamped": self.restamped,
            "unrouted": self.unrouted,
        }

    def late(self, stream: str) -> int:
        """Readings dropped because their window of ``stream`` was already closed."""
        for s in self._streams:
            if s.name == stream:
                return s.late
        raise KeyError(stream)


def _offset(clock: Clock) -> int:
    if isinstance(clock, ClockSync):
        return clock.offset_ns()
    return clock.wall_ns() - clock.mono_ns()


def _stamp(r: Reading) -> int:
    return r.ts_ns


def _order(w: Window) -> tuple[int, int, str]:
    return (w.end_ns, w.start_ns, w.stream)
