"""Reconnect backoff (full jitter, capped) and the AIMD replay pacer."""

from __future__ import annotations

import random
import socket

import pytest

from agent.uplink.backoff import Backoff, ReplayPacer
from agent.uplink.reach import PortProbe


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    b = Backoff(4.0, base_s=0.5, rng=random.Random(7))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [b.next_delay() for _ in ceilings]
    for d, c in zip(delays, ceilings, strict=True):
        assert 0.0 <= d <= c
    many = [Backoff(4.0, base_s=0.5, rng=random.Random(i)) for i in range(200)]
    tenth = [m.next_delay() for m in many for _ in range(10)][9::10]
    # Full jitter: spread over the whole [0, cap] range, not bunched at the cap.
    assert min(tenth) < 1.0 and max(tenth) > 3.0 and max(tenth) <= 4.0
    b.reset()
    assert b.attempt == 0 and b.next_delay() <= 0.5
    with pytest.raises(ValueError):
        Backoff(0)


def test_pacer_spends_tokens_at_its_rate() -> None:
    p = ReplayPacer(100.0, min_rate=1.0)
    p.rate = 50.0
    now = 1000.0
    assert p.take(now)
    sent = 0
    for i in range(1, 201):  # two simulated seconds in 10 ms steps
        while p.take(now + i * 0.01):
            sent += 1
    assert 95 <= sent <= 105
    assert 0 < p.wait_s(now + 2.0) <= 1 / 50


def test_pacer_aimd_on_puback_latency() -> None:
    p = ReplayPacer(1000.0, ramp_s=5.0, latency_floor_s=0.1, hold_s=1.0)
    start = p.rate
    t = 0.0
    for _ in range(2000):  # timely PUBACKs: additive increase, capped
        t += 0.001
        p.on_ack(0.01, t)
    assert p.rate > start and p.rate <= 1000.0
    before = p.rate
    p.on_ack(0.5, t)  # far over 4x the best latency and the floor: halve
    assert p.rate == pytest.approx(before / 2)
    p.on_ack(0.5, t + 0.5)  # within the hold time: no second cut
    assert p.rate == pytest.approx(before / 2)
    p.on_ack(0.5, t + 1.5)
    assert p.rate == pytest.approx(before / 4)
    for k in range(50):
        p.on_failure(t + 2 + k * 2)
    assert p.rate == p.min_rate > 0


async def test_port_probe_tells_a_closed_port_from_an_open_one() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = PortProbe("127.0.0.1", port, rng=random.Random(1))
        assert await probe.check() is None
    closed = await probe.check()  # the listener is gone
    assert closed is not None and "refused" in closed.lower() and not probe.dns_failed
    assert all(0.05 <= probe.interval_s() <= 0.5 for _ in range(100))
