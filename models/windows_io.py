"""Stream windows as JSON, and stream windows made from site-data rows.

The shipped sample windows (``samples/<model>.json``) are stored in this form; ``model test``
replays them through the inference stage exactly as the runtime would deliver them.
"""

from __future__ import annotations

import math
from typing import Any

from agent.readings import ChannelStats, Window
from models.csvdata import SiteData

_NS = 1_000_000_000


def _num(v: float) -> float | None:
    return None if math.isnan(v) else v


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def window_to_dict(w: Window) -> dict[str, Any]:
    return {
        "stream": w.stream, "start_ns": w.start_ns, "end_ns": w.end_ns,
        "channels": {k: _stats_dict(s) for k, s in w.channels.items()},
        "fused": {k: _stats_dict(s) for k, s in w.fused.items()},
        "derived": {k: _num(v) for k, v in w.derived.items()},
        "flags": list(w.flags),
    }


def _stats_dict(s: ChannelStats) -> dict[str, Any]:
    return {"count": s.count, "mean": _num(s.mean), "min": _num(s.min), "max": _num(s.max),
            "last": _num(s.last), "std": _num(s.std), "unit": s.unit, "suspect": s.suspect,
            "bad": s.bad}


def _stats(d: dict[str, Any]) -> ChannelStats:
    return ChannelStats(int(d["count"]), _float(d["mean"]), _float(d["min"]), _float(d["max"]),
                        _float(d["last"]), _float(d["std"]), str(d["unit"]),
                        int(d.get("suspect", 0)), int(d.get("bad", 0)))


def window_from_dict(d: dict[str, Any]) -> Window:
    return Window(
        stream=str(d["stream"]), start_ns=int(d["start_ns"]), end_ns=int(d["end_ns"]),
        channels={k: _stats(v) for k, v in d.get("channels", {}).items()},
        fused={k: _stats(v) for k, v in d.get("fused", {}).items()},
        derived={k: _float(v) for k, v in d.get("derived", {}).items()},
        flags=tuple(d.get("flags", ())),
    )


def _point(value: float, count: int, unit: str) -> ChannelStats:
    return ChannelStats(count, value, value, value, value, 0.0, unit)


def site_window(data: SiteData, i: int, kind: str, stream: str) -> Window:
    """Row ``i`` as the window a gateway stream would produce (radar + loops, or a meter),
    with the BME280 channels and the ``derived`` values of CHANNELS.md."""
    start = int(data.ts_s[i]) * _NS
    end = start + data.window_s * _NS
    ch: dict[str, ChannelStats] = {}
    derived: dict[str, float] = {}
    col = {k: float(v[i]) for k, v in data.columns.items()}
    for q, unit in (("temperature", "degC"), ("humidity", "%RH")):
        if math.isfinite(col.get(q, math.nan)):
            ch[f"env.{q}"] = _point(col[q], 1, unit)
    if kind == "traffic":
        vin, vout = col.get("vehicles_in", math.nan), col.get("vehicles_out", math.nan)
        radar_up = math.isfinite(vin) and math.isfinite(vout)
        total = 0.0
        weighted = 0.0
        for q, n in (("speed_in", vin), ("speed_out", vout)):
            v = col.get(f"{q}_mean", math.nan)
            if radar_up and n > 0 and math.isfinite(v):
                ch[f"radar.{q}"] = _point(v, int(n), "m/s")
                total += n
                weighted += v * n
            derived[f"{q}_mean"] = v if radar_up and n > 0 else math.nan
        if radar_up:
            derived["vehicles"] = vin + vout
            derived["flow_veh_h"] = (vin + vout) * 3600 / data.window_s
        derived["speed_mean"] = weighted / total if total > 0 else math.nan
        occ = col.get("occupancy", math.nan)
        if math.isfinite(occ):
            ch["loop.occupancy"] = _point(occ, 1, "1")
        derived["occupancy"] = occ
    else:
        p = col.get("power_mean_w", math.nan)
        if math.isfinite(p):
            ch["meter.active_power"] = _point(p, 1, "W")
        derived["power_mean_w"] = p
        derived["energy_wh"] = p * data.window_s / 3600
    return Window(stream, start, end, ch, {}, derived)


def _split_count(n: int, parts: int, k: int) -> int:
    """Sub-window k's share of n events, spread as evenly as whole events allow."""
    return (n * (k + 1)) // parts - (n * k) // parts


def split_window(w: Window, parts: int) -> list[Window]:
    """A window as ``parts`` equal, consecutive shorter windows whose roll-up gives it back:
    radar events spread across them at the window's mean speeds, levels (occupancy, power,
    weather) repeated. Used to replay the 300 s samples as a gateway's 10 s or 60 s stream."""
    span = w.end_ns - w.start_ns
    if parts < 1 or span % parts:
        raise ValueError(f"cannot split a {span} ns window into {parts} equal windows")
    step = span // parts
    out = []
    for k in range(parts):
        ch: dict[str, ChannelStats] = {}
        derived = dict(w.derived)
        events: dict[str, tuple[int, float]] = {}  # quantity -> (events here, mean speed)
        for name, s in w.channels.items():
            q = name.rsplit(".", 1)[-1]
            if q in ("speed_in", "speed_out"):
                n = _split_count(s.count, parts, k)
                events[q] = (n, s.mean)
                if n:
                    ch[name] = ChannelStats(n, s.mean, s.min, s.max, s.last, s.std, s.unit)
            else:
                ch[name] = s
        if events:
            total = sum(n for n, _ in events.values())
            weighted = sum(v * n for n, v in events.values() if n)
            for q, (n, v) in events.items():
                derived[f"{q}_mean"] = v if n else math.nan
            derived["vehicles"] = float(total)
            derived["flow_veh_h"] = total * 3600 * _NS / step
            derived["speed_mean"] = weighted / total if total else math.nan
        elif math.isfinite(derived.get("vehicles", math.nan)):
            derived["vehicles"] = derived["vehicles"] / parts
        if "energy_wh" in derived:
            derived["energy_wh"] = derived["energy_wh"] / parts
        out.append(Window(w.stream, w.start_ns + k * step, w.start_ns + (k + 1) * step, ch,
                          dict(w.fused), derived, w.flags))
    return out
