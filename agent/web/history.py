"""What the page shows of the last hour: window means per channel, model outputs, outbox depth
and uplink state over time, and recent warnings. Everything is bounded.

It is fed by the pipeline's window and inference hooks (one append per closed window) and by a
logging handler, so it costs a few appends per window while the page is on and nothing at all
when the page is off (it is never created).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.readings import Inference, Window

HORIZON_S = 3600.0
MAX_POINTS = 360  # per series: one per 10 s window over an hour
MAX_SERIES = 512  # channels are bounded by the config; this guards against a runaway one
MAX_WARNINGS = 50
STATUS_EVERY_S = 10.0

Point = tuple[float, float]


class Series:
    __slots__ = ("points",)

    def __init__(self) -> None:
        self.points: deque[Point] = deque(maxlen=MAX_POINTS)

    def add(self, t_s: float, value: float) -> None:
        if math.isfinite(value):
            self.points.append((t_s, value))

    def recent(self, now_s: float) -> list[list[float]]:
        cutoff = now_s - HORIZON_S
        return [[round(t, 3), v] for t, v in self.points if t >= cutoff]


class History:
    def __init__(self, status: Callable[[], tuple[int | None, str | None]] | None = None) -> None:
        """``status`` returns (outbox rows, uplink state), sampled as windows close."""
        self.channels: dict[str, Series] = {}
        self.outputs: dict[str, Series] = {}  # "model.output"
        self.outbox_rows = Series()
        self.uplink: deque[tuple[float, str]] = deque(maxlen=MAX_POINTS)
        self.last_windows: dict[str, dict[str, Any]] = {}
        self.warnings: deque[dict[str, Any]] = deque(maxlen=MAX_WARNINGS)
        self._status = status
        self._last_status_s = 0.0

    def _series(self, table: dict[str, Series], key: str) -> Series | None:
        s = table.get(key)
        if s is None and len(table) < MAX_SERIES:
            s = table[key] = Series()
        return s

    def on_window(self, w: Window) -> None:
        t = w.end_ns / 1e9
        for name, c in {**w.channels, **w.fused}.items():
            if c.count and (s := self._series(self.channels, name)) is not None:
                s.add(t, c.mean)
        self.last_windows[w.stream] = {
            "start_ns": w.start_ns, "end_ns": w.end_ns, "flags": list(w.flags),
            "channels": {k: {"count": c.count, "mean": c.mean, "min": c.min, "max": c.max,
                             "unit": c.unit} for k, c in w.channels.items()},
            "derived": dict(w.derived)}
        if self._status is not None and time.monotonic() - self._last_status_s >= STATUS_EVERY_S:
            self._last_status_s = time.monotonic()
            rows, state = self._status()
            now = time.time()
            if rows is not None:
                self.outbox_rows.add(now, float(rows))
            if state is not None:
                self.uplink.append((now, state))

    def on_inference(self, inf: Inference, model: dict[str, Any] | None = None) -> None:
        """``model`` is the model's status: the forecast output is drawn at the window it
        forecasts, beside the actual value of each window (``<model>.<output>:actual``)."""
        if inf.shadow:
            return
        t = inf.window_start_ns / 1e9
        model = model or {}
        forecast = model.get("forecast_output")
        ahead = float(model.get("window_s") or 0)
        for out, v in inf.outputs.items():
            if isinstance(v, (int, float)) and (s := self._series(
                    self.outputs, f"{inf.model}.{out}")) is not None:
                s.add(t + ahead if out == forecast else t, float(v))
        actual = model.get("last_actual")
        if forecast and isinstance(actual, (int, float)) and (s := self._series(
                self.outputs, f"{inf.model}.{forecast}:actual")) is not None:
            s.add(t, float(actual))

    def view(self) -> dict[str, Any]:
        now = time.time()
        cutoff = now - HORIZON_S
        return {
            "channels": {k: s.recent(now) for k, s in self.channels.items()},
            "outputs": {k: s.recent(now) for k, s in self.outputs.items()},
            "outbox_rows": self.outbox_rows.recent(now),
            "uplink": [[round(t, 3), s] for t, s in self.uplink if t >= cutoff],
            "windows": self.last_windows,
            "warnings": list(self.warnings),
        }


class WarningLog(logging.Handler):
    """Keeps the last warnings and errors of the agent's loggers for the page."""

    def __init__(self, history: History) -> None:
        super().__init__(logging.WARNING)
        self.history = history

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not break logging
            msg = str(record.msg)
        self.history.warnings.append({"ts": record.created, "level": record.levelname,
                                      "logger": record.name, "message": msg[:500]})
