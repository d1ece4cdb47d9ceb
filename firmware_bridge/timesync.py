"""MCU clock -> host monotonic clock, from round trips (HELLO, PING/PONG).

Each round trip gives one sample: the host sends at ``t0``, the device stamps its clock ``m``
(microseconds since boot) while answering, the host receives at ``t1``. The device stamped
somewhere in ``[t0, t1]``; the midpoint is the estimate and ``(t1 - t0) / 2`` its error bound.
The mapping ``host = offset + (1 + drift) * m`` is a least-squares line through recent samples,
each weighted by ``1 / rtt**2`` so that a round trip delayed by queueing barely counts. The
drift (crystal tolerance, typically tens of ppm) is only estimated once the samples span
``min_span_s``; before that the line has slope 1 and goes through the tightest sample.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MAX_DRIFT_PPM = 5000.0  # a worse estimate is noise (an RC oscillator is within ~1 %)


@dataclass(frozen=True, slots=True)
class Sample:
    mcu_ns: int
    host_ns: int  # midpoint of the round trip, host monotonic clock
    rtt_ns: int


class ClockMap:
    def __init__(self, max_samples: int = 32, min_span_s: float = 2.0) -> None:
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self.min_span_ns = int(min_span_s * 1e9)
        self._origin: tuple[int, int] | None = None  # (mcu_ns, host_ns) the line goes through
        self.drift = 0.0

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def drift_ppm(self) -> float:
        return self.drift * 1e6

    @property
    def best_rtt_ns(self) -> int | None:
        return min((s.rtt_ns for s in self._samples), default=None)

    def reset(self) -> None:
        """Forget every sample: the device rebooted, its clock started again from zero."""
        self._samples.clear()
        self._origin = None
        self.drift = 0.0

    def add(self, sent_ns: int, received_ns: int, mcu_time_us: int) -> None:
        rtt = max(0, received_ns - sent_ns)
        mcu_ns = mcu_time_us * 1000
        if self._samples and mcu_ns < self._samples[-1].mcu_ns:
            self.reset()  # the device clock went backwards: it rebooted
        self._samples.append(Sample(mcu_ns, sent_ns + rtt // 2, rtt))
        self._fit()

    def _fit(self) -> None:
        samples = list(self._samples)
        # Work relative to the first sample: nanosecond counts squared overflow float precision.
        x0, y0 = samples[0].mcu_ns, samples[0].host_ns
        weights = [1.0 / (max(s.rtt_ns, 1000) ** 2) for s in samples]
        xs = [float(s.mcu_ns - x0) for s in samples]
        ys = [float(s.host_ns - y0) for s in samples]
        span = max(xs) - min(xs)
        slope = 1.0
        if len(samples) >= 2 and span >= self.min_span_ns:
            wsum = sum(weights)
            mx = sum(w * x for w, x in zip(weights, xs, strict=True)) / wsum
            my = sum(w * y for w, y in zip(weights, ys, strict=True)) / wsum
            sxx = sum(w * (x - mx) ** 2 for w, x in zip(weights, xs, strict=True))
            sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(weights, xs, ys, strict=True))
            if sxx > 0:
                candidate = sxy / sxx
                if abs(candidate - 1.0) * 1e6 <= MAX_DRIFT_PPM:
                    slope = candidate
            self.drift = slope - 1.0
            self._origin = (x0 + int(mx), y0 + int(my))
        else:
            best = min(samples, key=lambda s: s.rtt_ns)
            self.drift = 0.0
            self._origin = (best.mcu_ns, best.host_ns)

    def to_host_ns(self, mcu_time_us: int) -> int | None:
        """Host monotonic ns of a device timestamp, or None before the first sample."""
        if self._origin is None:
            return None
        mx, my = self._origin
        return my + round((mcu_time_us * 1000 - mx) * (1.0 + self.drift))

    @property
    def offset_ns(self) -> int | None:
        """Host monotonic ns at device time zero (its boot, as the host clock saw it)."""
        return self.to_host_ns(0)
