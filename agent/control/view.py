"""The ``edge-agent status`` screen and the JSON Schema of what ``status --json`` prints.

The snapshot is the health message's body, typed once in ``agent.health``; its objects are open
so the stages can add counters without breaking old readers. ``docs/status.schema.json`` is
generated from that model (``edge-agent status --schema``); a test keeps the two equal.

Rendering takes the snapshot as plain data: plain text when the output is piped, a coloured
table (``rich``, when installed) on a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from agent.control.units import for_display
from agent.health import HealthSnapshot


def status_schema() -> dict[str, Any]:
    schema = HealthSnapshot.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# -- formatting helpers -------------------------------------------------------------------

def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(seconds)
    days, rem = divmod(s, 86_400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def fmt_age(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return fmt_duration(seconds)


def fmt_number(value: Any) -> str:
    """Counts in full, measurements to four significant digits, never in exponent form."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.1f}".removesuffix(".0")
    if 0 < abs(value) < 0.001:
        return f"{value:.3g}"
    return f"{value:.4g}"


def _first(d: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def sensor_value(sensor: Mapping[str, Any]) -> str:
    values = sensor.get("last_values") or {}
    parts = []
    for quantity, v in values.items():
        flag = "" if v.get("quality") in (None, "good") else f" [{v.get('quality')}]"
        value, unit = for_display(v.get("value"), v.get("unit"))
        parts.append(f"{quantity} {fmt_number(value)} {unit}".rstrip() + flag)
    return ", ".join(parts) or "-"


def _ago(seconds: Any) -> str:
    return f" ({fmt_age(seconds)} ago)" if isinstance(seconds, (int, float)) else ""


def _retry(seconds: Any, what: str) -> str:
    return f"{what} in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""


def sensor_errors(sensor: Mapping[str, Any]) -> str:
    failures = sensor.get("failures", 0)
    in_row = sensor.get("consecutive_failures", 0)
    text = f"{failures}" + (f" ({in_row} in a row)" if in_row else "")
    if retry := _retry(sensor.get("next_retry_in_s"), "retry"):
        text += f", {retry}"
    if sensor.get("last_error") and (failures or in_row):
        text += f": {sensor['last_error']}{_ago(sensor.get('last_error_age_s'))}"
    return text


def uplink_line(uplink: Mapping[str, Any]) -> str:
    state = _first(uplink, "state", "status", "link")
    if state is None and "connected" in uplink:
        state = "connected" if uplink["connected"] else "disconnected"
    parts = [str(state or "unknown")]
    broker = _first(uplink, "broker")
    if broker is None and "host" in uplink:
        broker = f"{uplink['host']}:{uplink.get('port', '')}".rstrip(":")
    if broker:
        parts.append(f"to {broker}")
    puback = _first(uplink, "last_puback_age_s", "puback_age_s")
    parts.append(f"last PUBACK {fmt_age(puback)} ago" if puback is not None else "no PUBACK yet")
    inflight = _first(uplink, "inflight", "in_flight")
    if inflight is not None:
        parts.append(f"in flight {inflight}")
    if retry := _retry(uplink.get("next_attempt_in_s"), "next attempt"):
        parts.append(retry)
    error = _first(uplink, "last_error", "error")
    if error:
        parts.append(f"last error{_ago(uplink.get('last_error_age_s'))}: {error}")
    return "  ".join(parts)


def _total(value: Any) -> float | None:
    """A count that may come as a number or broken down by class."""
    if isinstance(value, Mapping):
        return sum(v for v in value.values() if isinstance(v, (int, float)))
    return value if isinstance(value, (int, float)) else None


def fmt_breakdown(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {fmt_number(v)}" for k, v in value.items()) or "-"
    return fmt_number(value)


def outbox_line(outbox: Mapping[str, Any]) -> str:
    rows = _first(outbox, "rows")
    depth = outbox.get("depth")
    if rows is None:
        rows = _total(depth)
    text = f"depth {fmt_number(rows) if rows is not None else '?'}"
    if isinstance(depth, Mapping) and depth:
        text += f" ({fmt_breakdown(depth)})"
    text += f"  oldest {fmt_age(_first(outbox, 'oldest_age_s', 'oldest_s'))}"
    dropped = _total(_first(outbox, "drops", "dropped", default=0))
    text += f"  dropped {fmt_number(dropped if dropped is not None else 0)}"
    if outbox.get("quarantined"):
        text += f"  quarantined {fmt_number(outbox['quarantined'])}"
    return text


def fmt_bytes(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # not reached


def fmt_value(value: Any) -> str:
    """Any JSON value as a technician reads it: no braces, quotes or ``None``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        shown = [f"{k} {fmt_value(v)}" for k, v in value.items() if v not in (None, 0, {}, [])]
        return ", ".join(shown) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(fmt_value(v) for v in value) or "none"
    return fmt_number(value)


# The outbox figures a technician asks about first, each with its label and how it is shown;
# whatever else the agent reports follows under its own name.
OUTBOX_ROWS: tuple[tuple[str, str, Any], ...] = (
    ("path", "file", str),
    ("rows", "rows", fmt_number),
    ("depth", "  by class", fmt_value),
    ("bytes", "size", fmt_bytes),
    ("oldest_age_s", "oldest", lambda v: f"{fmt_age(v)} ago" if v is not None else "-"),
    ("pending", "not committed", fmt_number),
    ("accepted_seq", "last seq", fmt_value),
    ("next_seq", "next seq", fmt_value),
    ("drops", "dropped", fmt_value),
    ("drops_by_reason", "  by reason", fmt_value),
    ("quarantined", "quarantined", fmt_value),
    ("commits", "commits", fmt_number),
    ("commit_errors", "commit errors", fmt_number),
    ("last_commit_ms", "last commit", lambda v: f"{fmt_number(v)} ms"),
    ("max_commit_ms", "slowest commit", lambda v: f"{fmt_number(v)} ms"),
)
OUTBOX_HIDDEN = {"bytes_by_class"}  # shown inside "size" would be noise; --json has it


def outbox_stats_lines(stats: Mapping[str, Any]) -> list[str]:
    rows: list[tuple[str, str]] = []
    for key, label, show in OUTBOX_ROWS:
        if key in stats:
            rows.append((label, show(stats[key]) if stats[key] is not None else "-"))
    known = {k for k, _, _ in OUTBOX_ROWS} | OUTBOX_HIDDEN
    rows.extend((k.replace("_", " "), fmt_value(v)) for k, v in stats.items() if k not in known)
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


MODEL_HEADER = ("MODEL", "VERSION", "SOURCE / SKILL", "LAST OUTPUT")


def guard_text(st: Mapping[str, Any]) -> str:
    """``model +12%`` / ``fallback -8%`` / ``fallback (scoring)``: what is published and the
    model's running skill against persistence; extrapolated inputs after a ``!``."""
    guard = st.get("guard")
    if not isinstance(guard, Mapping):
        return "-"
    if guard.get("enabled") is False:
        text = "model (no guard)"
    else:
        skill = guard.get("skill")
        source = str(guard.get("last_source") or guard.get("source") or "-")
        text = (f"{source} {skill * 100:+.0f}%" if isinstance(skill, (int, float))
                and not isinstance(skill, bool) else f"{source} (scoring)")
    flagged = st.get("out_of_range")
    if isinstance(flagged, list) and flagged:
        text += " !" + ",".join(str(f) for f in flagged)
    return text


def model_rows(models: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    status = models.get("status") or {}
    if isinstance(status, Mapping) and isinstance(status.get("models"), Mapping):
        status = status["models"]
    last = models.get("last") or {}
    names: list[str] = []
    if isinstance(status, Mapping):
        names.extend(str(n) for n in status)
    elif isinstance(status, list):
        names.extend(str(m.get("name")) for m in status if isinstance(m, Mapping))
    names.extend(n for n in last if n not in names)
    rows = []
    for name in names:
        info = last.get(name) or {}
        st = status.get(name) if isinstance(status, Mapping) else None
        st = st if isinstance(st, Mapping) else {}
        version = _first(info, "version") or _first(st, "version", default="-")
        outputs = info.get("outputs") or st.get("last_outputs") or {}
        shown = (", ".join(f"{k}={fmt_number(v)}" for k, v in outputs.items())
                 if isinstance(outputs, Mapping) else str(outputs))
        runs_on = st.get("runs_on")  # where session.run goes, chosen at load
        version = f"{version} ({runs_on})" if isinstance(runs_on, str) else str(version)
        rows.append((name, version, guard_text(st), shown or "no output yet"))
    return rows


def clock_line(clock: Mapping[str, Any]) -> str:
    synced = clock.get("synced")
    text = {True: "synced", False: "NOT synced", None: "unknown"}.get(synced, str(synced))
    extra = [f"{k} {fmt_number(v)}" for k, v in clock.items() if k != "synced"]
    return "  ".join([text, *extra])


def header_line(agent: Mapping[str, Any]) -> str:
    line = (f"edge-agent {agent.get('version', '?')}  gateway {agent.get('gateway', '?')}  "
            f"up {fmt_duration(agent.get('uptime_s'))}  config {agent.get('config_file') or '-'} "
            f"(generation {agent.get('generation', '?')})")
    if agent.get("last_reload_error"):
        line += f"\nlast reload rejected: {agent['last_reload_error']}"
    return line


# -- screens ------------------------------------------------------------------------------

SENSOR_HEADER = ("SENSOR", "DRIVER", "STATE", "LAST VALUE", "AGE", "ERRORS")


def sensor_rows(sensors: list[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    return [(str(s.get("name")), str(s.get("driver", "")), str(s.get("state", "?")),
             sensor_value(s), fmt_age(s.get("last_reading_age_s")), sensor_errors(s))
            for s in sensors]


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return lines


def optional_lines(snap: Mapping[str, Any]) -> list[str]:
    """Lines for the parts that are off by default: the web server and Sparkplug."""
    lines = []
    web = snap.get("web")
    if isinstance(web, Mapping):
        parts = [p for p in ("page", "metrics") if web.get(p)]
        lines.append(f"web      {' + '.join(parts) or 'off'} on {web.get('url', '?')}, "
                     f"{fmt_number(web.get('watchers'))} watching")
    spb = snap.get("sparkplug")
    if isinstance(spb, Mapping):
        text = (f"sparkplug {spb.get('state', '?')} {spb.get('group_id', '?')}/"
                f"{spb.get('node_id', '?')}, bdSeq {fmt_number(spb.get('bd_seq'))}, "
                f"backlog {fmt_number(spb.get('backlog'))}")
        if spb.get("last_error"):
            text += f" ({spb['last_error']})"
        lines.append(text)
    return lines


def render_text(snap: Mapping[str, Any]) -> str:
    lines = [header_line(snap.get("agent", {})),
             f"clock    {clock_line(snap.get('clock', {}))}",
             f"uplink   {uplink_line(snap.get('uplink', {}))}",
             f"outbox   {outbox_line(snap.get('outbox', {}))}",
             *optional_lines(snap),
             ""]
    sensors = snap.get("sensors", [])
    lines.extend(table(SENSOR_HEADER, sensor_rows(sensors)) if sensors else ["no sensors"])
    models = model_rows(snap.get("models", {}))
    if models:
        lines.append("")
        lines.extend(table(MODEL_HEADER, models))
    return "\n".join(lines) + "\n"


STATE_STYLE = {"up": "green", "ok": "green", "starting": "yellow", "retrying": "yellow",
               "down": "bold red", "failed": "bold red", "disabled": "dim"}


# Columns that give way when the terminal is narrow: cut with an ellipsis (``--json`` has it all),
# never wrapped, so each sensor and model stays on one line.
ELASTIC = {"LAST VALUE", "ERRORS", "LAST OUTPUT", "SOURCE / SKILL"}
ELASTIC_MIN = 8
COLUMN_GAP = 3  # the table's divider and the padding either side of it


def fitted_widths(header: tuple[str, ...], rows: Sequence[Sequence[str]],
                  width: int) -> list[int | None]:
    """Widths for the elastic columns (None: its natural width) so a row fits ``width``: the
    fixed columns keep theirs, and the elastic ones share the rest, the narrowest first."""
    natural = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    elastic = [i for i, name in enumerate(header) if name in ELASTIC]
    left = width - COLUMN_GAP * (len(header) - 1) - sum(
        w for i, w in enumerate(natural) if i not in elastic)
    out: list[int | None] = [None] * len(header)
    if sum(natural[i] for i in elastic) <= left:
        return out
    pending = sorted(elastic, key=lambda i: natural[i])
    while pending:
        i = pending.pop(0)
        share = max(ELASTIC_MIN, left // (len(pending) + 1))
        out[i] = min(natural[i], share)
        left -= out[i] or 0
    return out


def _fitted_table(header: tuple[str, ...], rows: Sequence[Sequence[str]], width: int) -> Any:
    from rich import box
    from rich.table import Table

    t = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, w in zip(header, fitted_widths(header, rows, width), strict=True):
        t.add_column(name, no_wrap=True, overflow="ellipsis", width=w)
    return t


def render_rich(snap: Mapping[str, Any], out: TextIO, width: int | None = None) -> None:
    """The status screen for a terminal: ``width`` columns, or the terminal's own width."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(file=out, width=width)
    console.print(header_line(snap.get("agent", {})), style="bold", highlight=False, markup=False)
    clock = snap.get("clock", {})
    console.print(f"clock    {clock_line(clock)}",
                  style="green" if clock.get("synced") else "yellow", highlight=False, markup=False)
    console.print(f"uplink   {uplink_line(snap.get('uplink', {}))}", highlight=False, markup=False)
    console.print(f"outbox   {outbox_line(snap.get('outbox', {}))}", highlight=False, markup=False)
    for line in optional_lines(snap):
        console.print(line, highlight=False, markup=False)
    rows = sensor_rows(snap.get("sensors", []))
    sensors = _fitted_table(SENSOR_HEADER, rows, console.width)
    for row in rows:
        # Cells are text, not markup: a quality flag such as "[suspect]" must show.
        sensors.add_row(*map(escape, row[:2]),
                        f"[{STATE_STYLE.get(row[2], 'white')}]{escape(row[2])}[/]",
                        *map(escape, row[3:]))
    console.print(sensors)
    models = model_rows(snap.get("models", {}))
    if models:
        mt = _fitted_table(MODEL_HEADER, models, console.width)
        for row in models:
            mt.add_row(*map(escape, row))
        console.print(mt)
