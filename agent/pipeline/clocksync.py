"""Whether the wall clock can be trusted yet, and a Clock that copes until it can.

A Raspberry Pi has no RTC: it boots with the time it saved at shutdown (fake-hwclock) or with
1970, and steps to the right time once NTP answers, possibly minutes later or, in a cabinet
without a network, never. Three signs tell whether the time is right:

- the kernel's NTP state (``adjtimex``, read only): ``STA_UNSYNC`` is cleared by an NTP client
  (systemd-timesyncd, chrony, ntpd) once it disciplines the clock;
- ``/run/systemd/timesync/synchronized``, which systemd-timesyncd creates on first sync;
- a floor: a wall clock before this software could have been built is certainly wrong.

``ClockSync`` implements ``agent.clock.Clock``. While unsynced it stamps readings with the
monotonic clock plus the last known wall-minus-monotonic offset, so timestamps never jump
within a run; when the clock syncs, readings buffered by the windower are re-stamped from their
``mono_ns`` with the new offset (``restamp``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Final

from agent.pipeline.filters import TIME_REASONS
from agent.quality import CLOCK_UNSYNCED, RESTAMPED
from agent.readings import Quality, Reading

log = logging.getLogger(__name__)

STA_UNSYNC: Final = 0x0040  # linux/timex.h: clock not synchronised
TIMESYNC_FLAG: Final = "/run/systemd/timesync/synchronized"
EPOCH_FLOOR_NS: Final = 1_767_225_600 * 1_000_000_000  # 2026-01-01T00:00:00Z


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex of the legacy ``adjtimex`` symbol (C longs, on 32- and 64-bit alike)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


_adjtimex: Callable[..., int] | None = None
_adjtimex_looked_up = False


def kernel_synced() -> bool | None:
    """The kernel's view: False while ``STA_UNSYNC`` is set; None if it cannot be asked.

    ``modes = 0`` only reads the state, which needs no privilege.
    """
    global _adjtimex, _adjtimex_looked_up  # noqa: PLW0603 - one libc lookup per process
    if not _adjtimex_looked_up:
        _adjtimex_looked_up = True
        try:
            _adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
        except (OSError, AttributeError):
            _adjtimex = None
    if _adjtimex is None:
        return None
    tx = _Timex()
    if _adjtimex(ctypes.pointer(tx)) < 0:
        log.debug("adjtimex failed: errno %d", ctypes.get_errno())
        return None
    return not tx.status & STA_UNSYNC


class SyncDetector:
    """Decides from the wall time and the host's sync state whether the wall clock is right.

    Any source can be replaced (tests, hosts without systemd): ``kernel`` returns True/False or
    None for "cannot tell"; ``flag_path`` is a file whose existence means synced (None: unused).
    """

    def __init__(
        self,
        *,
        kernel: Callable[[], bool | None] = kernel_synced,
        flag_path: str | None = TIMESYNC_FLAG,
        floor_ns: int = EPOCH_FLOOR_NS,
    ) -> None:
        self.kernel = kernel
        self.flag_path = flag_path
        self.floor_ns = floor_ns

    def __call__(self, wall_ns: int) -> bool:
        if wall_ns < self.floor_ns:
            return False
        if self.flag_path is not None and os.path.exists(self.flag_path):
            return True
        state = self.kernel()
        # No way to ask (not Linux): a clock past the floor is the best evidence there is.
        return True if state is None else state


class ClockSync:
    """A Clock whose wall time is held steady while the host clock is not synchronised.

    The sync state is re-checked at most every ``check_interval_s`` (of monotonic time), when
    any method is called. ``offset_ns`` is wall minus monotonic: measured while synced, and
    while unsynced the last one measured (at start, the host clock's word for it).
    """

    def __init__(
        self,
        detector: Callable[[int], bool] | None = None,
        *,
        wall: Callable[[], int] = time.time_ns,
        mono: Callable[[], int] = time.monotonic_ns,
        check_interval_s: float = 1.0,
    ) -> None:
        self._detect = detector if detector is not None else SyncDetector()
        self._wall = wall
        self._mono = mono
        self._interval_ns = round(check_interval_s * 1e9)
        now_mono = mono()
        now_wall = wall()
        self._offset = now_wall - now_mono
        self._synced = self._detect(now_wall)
        self._synced_since: int | None = now_mono if self._synced else None
        self._next_check = now_mono + self._interval_ns
        self.syncs = 0  # transitions from unsynced to synced
        if not self._synced:
            log.warning("wall clock not synchronised: timestamps are provisional until it is")

    def _refresh(self, now_mono: int) -> None:
        self._next_check = now_mono + self._interval_ns
        wall = self._wall()
        ok = self._detect(wall)
        if ok:
            old = self._offset
            self._offset = wall - now_mono
            if not self._synced:
                self._synced_since = now_mono
                self.syncs += 1
                log.info("wall clock synchronised; it moved by %.3f s",
                         (self._offset - old) / 1e9)
        elif self._synced:
            # Keep the last synced offset: time runs on from the monotonic clock.
            self._synced_since = None
            log.warning("wall clock lost synchronisation")
        self._synced = ok

    def _tick(self) -> int:
        now = self._mono()
        if now >= self._next_check:
            self._refresh(now)
        return now

    def wall_ns(self) -> int:
        now = self._tick()
        if self._synced:
            return self._wall()
        return now + self._offset

    def mono_ns(self) -> int:
        return self._mono()

    def synced(self) -> bool:
        self._tick()
        return self._synced

    def offset_ns(self) -> int:
        """Wall minus monotonic time, ns: add it to a ``mono_ns`` to get a wall time."""
        self._tick()
        return self._offset

    def check_now(self) -> bool:
        """Re-check the sync state now, regardless of the interval."""
        self._refresh(self._mono())
        return self._synced

    def stamped_unsynced(self, mono_ns: int) -> bool:
        """Whether a reading taken at ``mono_ns`` was stamped before the clock was synced."""
        since = self._synced_since
        if since is None:
            self._tick()
            since = self._synced_since
        return since is None or mono_ns < since


def restamp(r: Reading, offset_ns: int) -> Reading:
    """The reading re-stamped from its monotonic time, flagged ``restamped`` instead of
    ``clock_unsynced``; its quality no longer counts the clock against it."""
    reasons = tuple(x for x in r.reasons if x != CLOCK_UNSYNCED)
    if RESTAMPED not in reasons:
        reasons += (RESTAMPED,)
    quality: Quality = "bad"
    if r.quality != "bad":
        quality = "suspect" if any(x not in TIME_REASONS for x in reasons) else "good"
    return dataclasses.replace(r, ts_ns=r.mono_ns + offset_ns, reasons=reasons, quality=quality)
