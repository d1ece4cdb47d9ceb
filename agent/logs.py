"""Logging to stdout in a form journald understands.

Under systemd (``JOURNAL_STREAM`` set) each line starts with an ``<N>`` syslog priority prefix,
so ``journalctl -p warning`` works; on a terminal lines carry a time and level instead. ``json``
gives one JSON object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {super().format(record)}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(level: str = "info", fmt: Literal["auto", "journal", "text", "json"] = "auto") -> None:
    if fmt == "auto":
        fmt = "journal" if os.environ.get("JOURNAL_STREAM") else "text"
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "journal":
        handler.setFormatter(JournalFormatter("%(message)s"))
    elif fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("amqtt", "transitions", "aiomqtt"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Throttle:
    """One log line per ``interval_s`` for a failure that repeats (a full disk fails every
    commit): the first at once, then the count of those held back with the next one, and a
    line when it stops. What is held back still goes to debug."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._held = 0
        self._failures = 0

    def log(self, level: int, msg: str, *args: Any) -> None:
        now = self._clock()
        self._failures += 1
        if self._last is not None and now - self._last < self.interval_s:
            self._held += 1
            self.logger.debug(msg, *args)
            return
        if self._held and self._last is not None:
            msg += f" ({self._held} more like this in the last {now - self._last:.0f} s)"
        self.logger.log(level, msg, *args)
        self._last, self._held = now, 0

    def recovered(self, msg: str, *args: Any) -> None:
        """Say once that the failure stopped, with how often it happened."""
        if not self._failures:
            return
        self.logger.info(f"{msg} (after {self._failures} failures)", *args)
        self._last, self._held, self._failures = None, 0, 0
