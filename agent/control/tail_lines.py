"""One line per item that ``edge-agent tail`` follows, in columns.

Every line starts with the time it arrived, so lines read in time order whatever they carry (a
window arrives when it closes, well after it started; its span is shown beside it). Then the
kind, the name and what was measured, each in a column of fixed width, so a stream of mixed
items stays readable. Units are the screen's (hPa, no "1"); ``tail --json`` has the items as
the agent sent them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from agent.control.units import for_display
from agent.control.view import fmt_number

KIND_WIDTH = 9
NAME_WIDTH = 26


def _clock(ns: Any = None) -> str:
    stamp = (dt.datetime.fromtimestamp(ns / 1e9) if isinstance(ns, int) and not
             isinstance(ns, bool) else dt.datetime.now())
    return stamp.strftime("%H:%M:%S.%f")[:-3]


def _measure(value: Any, unit: Any) -> str:
    shown, text = for_display(value, unit)
    return f"{fmt_number(shown)} {text}".rstrip()


def _line(kind: str, name: str, text: str) -> str:
    return f"{_clock()}  {kind:<{KIND_WIDTH}}  {name:<{NAME_WIDTH}}  {text}".rstrip()


def _span(item: Mapping[str, Any]) -> str:
    start, end = item.get("start_ns"), item.get("end_ns")
    if not isinstance(start, int):
        return ""
    to = f"-{_clock(end)[:8]}" if isinstance(end, int) else ""
    return f"[{_clock(start)[:8]}{to}]"


def format_item(item: Mapping[str, Any]) -> str:
    kind, name = str(item.get("kind", "?")), str(item.get("name", "?"))
    if kind == "reading":
        value = _measure(item.get("value"), item.get("unit"))
        flags = f" {','.join(map(str, item['reasons']))}" if item.get("reasons") else ""
        return _line(kind, f"{name}.{item.get('quantity')}",
                     f"{value:>16}  {item.get('quality', '')}{flags}")
    if kind == "window":
        channels = item.get("channels") or {}
        parts = [f"{ch}={_measure(c.get('mean'), c.get('unit'))}"
                 for ch, c in channels.items() if isinstance(c, Mapping)]
        derived = item.get("derived") or {}
        if isinstance(derived, Mapping):
            parts += [f"{k}={fmt_number(v)}" for k, v in derived.items()]
        flags = f"  [{','.join(map(str, item['flags']))}]" if item.get("flags") else ""
        return _line(kind, name, f"{_span(item)}  {'  '.join(parts)}{flags}".strip())
    if kind == "inference":
        outputs = item.get("outputs") or {}
        shown = ("  ".join(f"{k}={fmt_number(v)}" for k, v in outputs.items())
                 if isinstance(outputs, Mapping) else str(outputs))
        shadow = " (shadow)" if item.get("shadow") else ""
        latency = f"  {fmt_number(item.get('latency_ms'))} ms" if "latency_ms" in item else ""
        return _line(kind, f"{name}{shadow} {item.get('version', '')}".strip(),
                     f"{shown}{latency}")
    return _line(kind, name, json.dumps(item, sort_keys=True, default=str))
