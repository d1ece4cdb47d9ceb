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
from typing import Literal

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
