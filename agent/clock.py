"""Time sources. Injected everywhere so tests can drive time and the clock-sync logic."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall_ns(self) -> int: ...
    def mono_ns(self) -> int: ...
    def synced(self) -> bool: ...


class SystemClock:
    """The host clock. ``synced`` is refined by the clock-sync detector in agent.clean."""

    def wall_ns(self) -> int:
        return time.time_ns()

    def mono_ns(self) -> int:
        return time.monotonic_ns()

    def synced(self) -> bool:
        return True
