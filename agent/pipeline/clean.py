"""Per-channel cleaning: every reading is checked and flagged, never silently changed.

For each reading, in order:

1. duplicate: the same channel with the same timestamp as one of its last
   ``DEDUP_HISTORY`` readings is dropped and counted (``process`` returns None);
2. unit: a known non-canonical unit (hPa, mV, km/h, degF...) is converted; a unit that cannot
   be brought to the quantity's canonical unit is bad (``unit``);
3. ``not_finite`` (bad): NaN or inf;
4. ``out_of_range`` (bad): outside the physical range of the quantity;
5. ``rate`` (suspect): changed faster than the quantity can, from the last good value;
6. ``stuck`` (suspect): the same value too many times in a row where noise is expected;
   ``frozen`` (suspect): the same value ``FROZEN_RUN`` times in a row on a channel of a fuse
   group (``fuse_groups``) while a redundant channel kept changing;
7. ``spike`` (suspect): Hampel test against the median of the recent values (not run on a
   stuck value, which stays out of the spike window);
8. ``clock_unsynced`` (suspect): stamped before the wall clock was synchronised.

Bad and out-of-range values go no further (they would poison the spike window). Staleness is a
state, not a flag: no reading arrives to carry it, so ``stale(now_mono_ns)`` lists the channels
silent for longer than their ``stale_factor`` x the sensor period. After a gap longer than half
the spike window (in sensor periods, and than the stale limit) the spike and rate history is
forgotten, since the old level says nothing about the new one. Across a shorter gap the old
median is still a fair reference (it lags half a window behind the signal anyway), so a spike
just after the gap is caught.

A reading whose flags and value are unchanged is returned as is; otherwise a new Reading is
made with ``dataclasses.replace``, so the common path allocates nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Final, TypedDict

from agent.clock import Clock
from agent.config.cleaning import ChannelPolicy, resolve
from agent.config.schema import SensorConfig, StreamConfig
from agent.pipeline.clocksync import ClockSync
from agent.pipeline.filters import (
    BAD_REASONS,
    Hampel,
    RateLimit,
    Stuck,
    unit_conversion,
)
from agent.quality import (
    CLOCK_UNSYNCED,
    DUPLICATE,
    FROZEN,
    NOT_FINITE,
    OUT_OF_RANGE,
    RATE,
    SPIKE,
    STUCK,
    UNIT,
)
from agent.readings import UNITS, Quality, Reading

log = logging.getLogger(__name__)

# Timestamps remembered per channel to catch repeats: a bridge or a driver that re-sends a
# block after a retry repeats readings some way back, not only the previous one.
DEDUP_HISTORY: Final = 128
# Identical readings in a row after which a channel with redundant peers is ``frozen``, when one
# of the peers changed at least FROZEN_PEER_CHANGES times meanwhile. Much shorter than the
# ``stuck`` count, which has no second opinion and must tolerate a still environment.
FROZEN_RUN: Final = 10
FROZEN_PEER_CHANGES: Final = 5

_RANK: dict[str, int] = {"good": 0, "suspect": 1, "bad": 2}


class ChannelCounters(TypedDict):
    good: int
    suspect: int
    bad: int
    dropped: dict[str, int]  # by reason
    reasons: dict[str, int]  # flags raised, by reason
    stale: bool


class _Channel:
    """Everything the cleaner keeps about one channel, allocated once."""

    __slots__ = ("bad", "dropped", "good", "hampel", "last_mono", "name", "newest_ts", "peers",
                 "policy", "rate", "reasons", "seen_ring", "snap", "stuck",
                 "suspect")

    def __init__(self, name: str, policy: ChannelPolicy) -> None:
        self.name = name
        self.policy = policy
        self.hampel = (Hampel(policy.hampel_window, policy.hampel_k, policy.noise)
                       if policy.hampel_window is not None else None)
        self.rate = RateLimit(policy.max_rate) if policy.max_rate is not None else None
        self.stuck = Stuck(policy.stuck_count) if policy.stuck_count is not None else None
        self.peers: list[_Channel] = []  # redundant channels of the same quantity
        self.snap: list[int] = []  # the peers' changes when the current run of repeats began
        self.newest_ts = -(1 << 63)
        self.seen_ring: deque[int] = deque(maxlen=DEDUP_HISTORY)  # the latest timestamps
        self.last_mono: int | None = None
        self.good = 0
        self.suspect = 0
        self.bad = 0
        self.dropped: dict[str, int] = {}
        self.reasons: dict[str, int] = {}

    def forget_history(self) -> None:
        if self.hampel is not None:
            self.hampel.reset()
        if self.rate is not None:
            self.rate.reset()


def fuse_groups(streams: Sequence[StreamConfig]) -> list[list[str]]:
    """The channels of every fuse group of ``streams``: the redundant sets ``Cleaner`` compares
    for frozen sensors."""
    return [list(g.channels) for st in streams for g in st.fuse]


def _frozen(ch: _Channel, run: int) -> bool:
    """Whether a run of ``run`` identical values is a frozen sensor: long enough, while a
    redundant sensor of the same quantity kept changing (a still environment repeats itself
    on every sensor, and says nothing)."""
    if run == 2:
        ch.snap = [_changes(p) for p in ch.peers]
        return False
    if run < FROZEN_RUN:
        return False
    return any(_changes(p) - before >= FROZEN_PEER_CHANGES
               for p, before in zip(ch.peers, ch.snap, strict=False))


def _changes(ch: _Channel) -> int:
    return ch.stuck.changes if ch.stuck is not None else 0


class Cleaner:
    """Checks and flags readings channel by channel (see the module docstring).

    ``clock`` tells whether a reading was stamped on an unsynchronised clock: a ``ClockSync``
    answers per reading from its ``mono_ns``; any other Clock by its current ``synced()``.
    """

    def __init__(self, sensors: Sequence[SensorConfig], clock: Clock,
                 fuse_groups: Sequence[Sequence[str]] = ()) -> None:
        self._sensors = {s.name: s for s in sensors}
        self._clock = clock
        self._sync = clock if isinstance(clock, ClockSync) else None
        self._channels: dict[str, dict[str, _Channel]] = {}
        self._groups: dict[str, list[str]] = {}  # channel -> its redundant peers
        for group in fuse_groups:
            for name in group:
                self._groups.setdefault(name, []).extend(c for c in group if c != name)
        for s in sensors:
            for quantity, opts in s.clean.items():
                p = resolve(quantity, s.period_s, opts)
                if not p.min < p.max:
                    raise ValueError(
                        f"sensor {s.name!r}, clean.{quantity}: the range {p.min}..{p.max} is "
                        f"empty (an override crosses the default bound of {quantity!r})")

    def _new_channel(self, sensor: str, quantity: str) -> _Channel:
        cfg = self._sensors.get(sensor)
        if cfg is None:
            log.warning("readings from %r, which is not a configured sensor: default checks, "
                        "no staleness", sensor)
        policy = resolve(quantity, cfg.period_s if cfg else None,
                         cfg.clean.get(quantity) if cfg else None)
        ch = _Channel(f"{sensor}.{quantity}", policy)
        self._channels.setdefault(sensor, {})[quantity] = ch
        for peer_name in self._groups.get(ch.name, ()):
            peer_sensor, _, peer_quantity = peer_name.partition(".")
            peer = self._channels.get(peer_sensor, {}).get(peer_quantity)
            if peer is not None:
                ch.peers.append(peer)
                peer.peers.append(ch)
        return ch

    def process(self, r: Reading) -> Reading | None:
        """The reading with its flags, or None when it is a duplicate and was dropped."""
        by_q = self._channels.get(r.sensor)
        ch = by_q.get(r.quantity) if by_q is not None else None
        if ch is None:
            ch = self._new_channel(r.sensor, r.quantity)
        ts = r.ts_ns
        ring = ch.seen_ring
        if ts > ch.newest_ts:
            ch.newest_ts = ts  # newer than all: no repeat, and no search on the common path
        elif ts in ring:
            ch.dropped[DUPLICATE] = ch.dropped.get(DUPLICATE, 0) + 1
            return None
        ring.append(ts)  # the oldest falls out
        mono = r.mono_ns
        p = ch.policy
        last_mono = ch.last_mono
        if last_mono is None or mono > last_mono:
            if (last_mono is not None and p.forget_ns is not None
                    and mono - last_mono > p.forget_ns):
                ch.forget_history()
            ch.last_mono = mono

        value = r.value
        unit = r.unit
        reasons: tuple[str, ...] = ()
        if unit != p.unit and (p.unit or unit not in UNITS):
            conv = unit_conversion(unit, p.unit)
            if conv is not None and (conv[0] == p.unit or not p.unit):
                unit, scale, offset = conv
                value = value * scale + offset
            elif p.unit:
                reasons = (UNIT,)

        if not math.isfinite(value):
            reasons += (NOT_FINITE,)
        elif reasons or not p.enabled:
            pass  # a value in an unknown unit cannot be judged; a disabled channel is not
        elif not p.min <= value <= p.max:
            reasons = (OUT_OF_RANGE,)
        else:
            reasons = self._value_checks(ch, value, mono)

        unsynced = (self._sync.stamped_unsynced(mono) if self._sync is not None
                    else not self._clock.synced())
        if unsynced:
            reasons += (CLOCK_UNSYNCED,)

        if not reasons:
            if r.quality == "good":
                ch.good += 1
            else:
                self._count(ch, r.quality, r.reasons)
            if unit is r.unit and value is r.value:
                return r
            return dataclasses.replace(r, value=value, unit=unit)
        quality = r.quality
        for reason in reasons:
            q: Quality = "bad" if reason in BAD_REASONS else "suspect"
            if _RANK[q] > _RANK[quality]:
                quality = q
        all_reasons = r.reasons + reasons
        self._count(ch, quality, all_reasons)
        return dataclasses.replace(r, value=value, unit=unit, quality=quality,
                                   reasons=all_reasons)

    @staticmethod
    def _value_checks(ch: _Channel, value: float, mono: int) -> tuple[str, ...]:
        reasons: tuple[str, ...] = ()
        rate = ch.rate
        if rate is not None and rate.too_fast(value, mono):
            reasons = (RATE,)
        stuck = ch.stuck
        if stuck is not None and stuck.is_stuck(value):
            # A frozen value is not a measurement: kept out of the spike window, it cannot
            # shrink the spread there and make the resumed signal look like a spike.
            reasons += (STUCK,)
        elif stuck is not None and stuck.run > 1 and ch.peers and _frozen(ch, stuck.run):
            reasons += (FROZEN,)
        elif ch.hampel is not None and ch.hampel.is_spike(value):
            reasons += (SPIKE,)
        if rate is not None and not reasons:
            rate.accept(value, mono)
        return reasons

    @staticmethod
    def _count(ch: _Channel, quality: str, reasons: tuple[str, ...]) -> None:
        if quality == "good":
            ch.good += 1
            return
        if quality == "bad":
            ch.bad += 1
        else:
            ch.suspect += 1
        for reason in reasons:
            ch.reasons[reason] = ch.reasons.get(reason, 0) + 1

    def stale(self, now_mono_ns: int) -> list[str]:
        """Channels that have been silent for longer than their stale limit."""
        out = []
        for by_q in self._channels.values():
            for ch in by_q.values():
                limit = ch.policy.stale_ns
                if (limit is not None and ch.last_mono is not None
                        and now_mono_ns - ch.last_mono > limit):
                    out.append(ch.name)
        return out

    def counters(self, channel: str, now_mono_ns: int | None = None) -> ChannelCounters:
        """The counters of one channel (``sensor.quantity``); KeyError if never seen."""
        sensor, _, quantity = channel.partition(".")
        ch = self._channels[sensor][quantity]
        return self._counters(ch, now_mono_ns)

    def _counters(self, ch: _Channel, now_mono_ns: int | None) -> ChannelCounters:
        limit = ch.policy.stale_ns
        stale = (now_mono_ns is not None and limit is not None and ch.last_mono is not None
                 and now_mono_ns - ch.last_mono > limit)
        return ChannelCounters(good=ch.good, suspect=ch.suspect, bad=ch.bad,
                               dropped=dict(ch.dropped), reasons=dict(ch.reasons), stale=stale)

    def stats(self) -> dict[str, ChannelCounters]:
        """Counters of every channel seen, for health; staleness as of the clock's now."""
        now = self._clock.mono_ns()
        return {ch.name: self._counters(ch, now)
                for by_q in self._channels.values() for ch in by_q.values()}
