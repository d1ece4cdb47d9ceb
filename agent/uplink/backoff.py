"""How fast to try again: reconnect backoff, and the adaptive rate of backlog replay.

``Backoff`` is exponential with full jitter and a cap: the n-th delay is uniform in
``[0, min(cap, base * 2**n)]``, so a fleet of gateways that lost the same broker does not come
back in lockstep.

``ReplayPacer`` is a token bucket whose rate follows AIMD on PUBACK latency: every timely PUBACK
adds a little rate (additive increase, about ``max_rate / ramp_s`` per second), a PUBACK slower
than ``max(floor, 4 x the best recent latency)`` halves it (multiplicative decrease, at most
once per ``hold_s``). A healthy link ramps to ``max_rate``; a congested one backs off before
the live lane suffers.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Final

RECONNECT_BASE_S: Final = 0.5


class Backoff:
    def __init__(self, cap_s: float, *, base_s: float = RECONNECT_BASE_S,
                 rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s <= 0:
            raise ValueError("backoff base and cap must be positive")
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.Random()
        self._until_s: float | None = None

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self, delay_s: float) -> None:
        """Wait ``delay_s`` before the next attempt, which ``remaining_s`` counts down to."""
        self._until_s = time.monotonic() + delay_s
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._until_s = None

    def remaining_s(self) -> float | None:
        """Seconds to the next attempt while waiting for it; None when not waiting."""
        if self._until_s is None:
            return None
        return round(max(0.0, self._until_s - time.monotonic()), 3)


class ReplayPacer:
    def __init__(self, max_rate: float, *, min_rate: float | None = None, ramp_s: float = 5.0,
                 latency_floor_s: float = 0.25, hold_s: float = 1.0) -> None:
        if max_rate <= 0:
            raise ValueError("max_rate must be positive")
        self.max_rate = max_rate
        self.min_rate = min(max_rate, min_rate if min_rate is not None else max(1.0, max_rate / 50))
        self.rate = max(self.min_rate, max_rate / 4)
        self._step = max_rate / ramp_s  # rate gained per second of timely PUBACKs
        self._floor_s = latency_floor_s
        self._hold_s = hold_s
        self._best_s: float | None = None
        self._tokens = 1.0
        self._last_s: float | None = None
        self._hold_until_s = 0.0
        self.decreases = 0

    def _refill(self, now_s: float) -> None:
        if self._last_s is not None:
            burst = max(1.0, self.rate / 10)
            self._tokens = min(burst, self._tokens + (now_s - self._last_s) * self.rate)
        self._last_s = now_s

    def take(self, now_s: float) -> bool:
        """Spend one token if there is one."""
        self._refill(now_s)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_s(self, now_s: float) -> float:
        """Time until the next token."""
        self._refill(now_s)
        return max(0.0, (1.0 - self._tokens) / self.rate)

    def target_s(self) -> float:
        return max(self._floor_s, 4 * self._best_s) if self._best_s is not None else self._floor_s

    def on_ack(self, latency_s: float, now_s: float) -> None:
        # The best latency decays slowly upward so a route change is learned.
        self._best_s = latency_s if self._best_s is None else min(latency_s, self._best_s * 1.01)
        if latency_s > self.target_s():
            if now_s >= self._hold_until_s:
                self.rate = max(self.min_rate, self.rate / 2)
                self._hold_until_s = now_s + self._hold_s
                self.decreases += 1
            return
        self.rate = min(self.max_rate, self.rate + self._step / max(self.rate, 1.0))

    def on_failure(self, now_s: float) -> None:
        """The link failed: start the next replay gently."""
        self.rate = max(self.min_rate, self.rate / 2)
        self._hold_until_s = now_s + self._hold_s
        self._tokens = min(self._tokens, 1.0)
