"""From site data to model matrices: the feature specs of the shipped models, splits, baselines.

Feature rows are built by ``agent.pipeline.features.FeatureBuilder``, the code the gateway
runs, so the training inputs and the gateway's inputs cannot drift apart.

Split: whole weeks, assigned in a repeating pattern of ten (weeks 3 and 8 of each ten are test,
week 5 validation, the rest training). Held-out weeks lie in every season, which a single
chronological cut of one simulated year could not give (the last 20 % would be all
November/December). Rows whose target lies in another split than their inputs are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.pipeline.features import (
    WEATHER_QUANTITIES,
    WINDOW_QUANTITIES,
    FeatureSpec,
    InputSpec,
    feature_matrix,
    parse_input,
)
from models.csvdata import SiteData

WEEK_S = 7 * 86_400
TEST_WEEKS = (3, 8)
VAL_WEEKS = (5,)
SHORT_WEEKS = 5  # less history than this has no validation week: the short split
SHORT_VAL_DAY = 5

TRAFFIC_INPUTS = (
    "flow_veh_h", "flow_veh_h_lag1", "flow_veh_h_lag2", "flow_veh_h_lag3",
    "speed_mean", "speed_mean_lag1", "speed_mean_lag2", "speed_mean_lag3",
    "speed_in_mean", "speed_out_mean", "occupancy", "occupancy_lag1",
    "hour_sin", "hour_cos", "dow_sin", "dow_cos",
    "temperature", "humidity",
)
ENERGY_INPUTS = (
    "power_mean_w", "power_mean_w_lag1", "power_mean_w_lag2", "power_mean_w_lag3",
    "power_mean_w_lag5", "power_mean_w_lag11", "power_mean_w_lag287",
    "hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos",
    "temperature",
)
# The 4-input design this project started from (traffic volume, weather, day of week, hour).
ORIGINAL_INPUTS = ("flow_veh_h", "temperature", "dow", "hour")

UNITS = {
    "flow_veh_h": "veh/h", "speed_mean": "m/s", "speed_in_mean": "m/s", "speed_out_mean": "m/s",
    "occupancy": "1", "power_mean_w": "W", "temperature": "degC", "humidity": "%RH",
}
# How long a last good value stands in for a missing one (s): short for traffic quantities
# (night windows with no vehicles), longer for slowly varying weather.
HOLD_S = {
    "flow_veh_h": 900.0, "speed_mean": 900.0, "speed_in_mean": 900.0, "speed_out_mean": 900.0,
    "occupancy": 900.0, "power_mean_w": 900.0, "temperature": 3600.0, "humidity": 3600.0,
}


@dataclass(frozen=True)
class ModelData:
    name: str
    spec: FeatureSpec
    x: np.ndarray  # (n, F) float32, inputs of window t
    y: np.ndarray  # (n,) float32, target quantity of window t + 1 (NaN when unmeasured)
    split: np.ndarray  # (n,) 0 train, 1 validation, 2 test
    persistence: np.ndarray  # forecast = the current (held) value, else the fill
    seasonal: np.ndarray  # forecast = the value one season earlier, else persistence
    original_x: np.ndarray  # (n, 4) inputs of the original 4-64-1 design
    labels: np.ndarray  # (n,) anomaly label of window t + 1 (0 when unknown)
    ts_s: np.ndarray  # (n,) start of window t


def quantities(data: SiteData) -> dict[str, np.ndarray]:
    """Per-window quantities (the names the gateway derives) from the CSV columns."""
    vin, vout = data.col("vehicles_in"), data.col("vehicles_out")
    sin_, sout = data.col("speed_in_mean"), data.col("speed_out_mean")
    n = vin + vout
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nan_to_num(sin_ * vin) + np.nan_to_num(sout * vout)
        weight = np.where(np.isfinite(sin_), vin, 0) + np.where(np.isfinite(sout), vout, 0)
        speed = np.where(weight > 0, total / weight, np.nan)
    return {
        "flow_veh_h": n * 3600.0 / data.window_s,
        "speed_in_mean": sin_,
        "speed_out_mean": sout,
        "speed_mean": speed,
        "occupancy": data.col("occupancy"),
        "power_mean_w": data.col("power_mean_w"),
        "temperature": data.col("temperature"),
        "humidity": data.col("humidity"),
    }


def split_of(ts_s: np.ndarray) -> np.ndarray:
    """0 train, 1 validation, 2 test. A year: whole weeks in a repeating pattern of ten. A short
    history (a site's first weeks, fewer than ``SHORT_WEEKS``): one day a week validates, the
    rest trains, nothing is held out; its test is the weeks that follow, at the site."""
    out = np.zeros(len(ts_s), dtype=np.int8)
    if len(ts_s) and ts_s[-1] - ts_s[0] < SHORT_WEEKS * WEEK_S:
        day = (ts_s - ts_s[0]) // 86_400
        out[day % 7 == SHORT_VAL_DAY] = 1
        return out
    week = (ts_s - ts_s[0]) // WEEK_S % 10
    out[np.isin(week, VAL_WEEKS)] = 1
    out[np.isin(week, TEST_WEEKS)] = 2
    return out


def fills(q: dict[str, np.ndarray], train: np.ndarray) -> dict[str, float]:
    """Per-quantity fill: the training median, except flow (no events most often means none)."""
    out = {}
    for name, v in q.items():
        vals = v[train & np.isfinite(v)]
        out[name] = float(np.median(vals)) if len(vals) else 0.0
    out["flow_veh_h"] = 0.0
    return out


def make_spec(
    inputs: tuple[str, ...], fill: dict[str, float], window_s: int, tz: str
) -> FeatureSpec:
    specs = []
    for name in inputs:
        base, _ = parse_input(name)
        specs.append(InputSpec(name, fill.get(base, 0.0)))
    return FeatureSpec(tuple(specs), window_s, tz, {k: v for k, v in HOLD_S.items()})


def _held(v: np.ndarray, limit: int) -> np.ndarray:
    """Forward fill NaNs for at most ``limit`` steps (the features' hold policy)."""
    out = v.copy()
    last, age = math.nan, limit + 1
    for i, x in enumerate(v):
        if math.isfinite(x):
            last, age = x, 0
        else:
            age += 1
            out[i] = last if age <= limit else math.nan
    return out


def build(name: str, data: SiteData, spec: FeatureSpec | None = None) -> ModelData:
    """Rows of model ``name`` from the site data, with the site's own feature spec (fills from
    its training weeks, its time zone) or, given ``spec``, the one a deployed model carries."""
    if name not in ("traffic", "energy"):
        raise ValueError(f"unknown model {name!r} (known: traffic, energy)")
    q = quantities(data)
    split = split_of(data.ts_s)
    target_q = "speed_mean" if name == "traffic" else "power_mean_w"
    fill = fills(q, split == 0)
    if spec is None:
        spec = make_spec(TRAFFIC_INPUTS if name == "traffic" else ENERGY_INPUTS, fill,
                         data.window_s, data.timezone)
    inputs = spec.names
    starts = (data.ts_s * 1_000_000_000).tolist()
    keys = WINDOW_QUANTITIES + WEATHER_QUANTITIES
    rows = [{k: float(q[k][i]) for k in keys if k in q} for i in range(len(data))]
    x = feature_matrix(spec, starts, rows)

    y = np.append(q[target_q][1:], np.nan).astype(np.float32)
    split_next = np.append(split[1:], -1)
    keep = np.isfinite(y) & (split == split_next)
    held = _held(q[target_q], int(HOLD_S[target_q] // data.window_s))
    persistence = np.where(np.isfinite(held), held, fill[target_q])
    season = (WEEK_S if name == "traffic" else 86_400) // data.window_s
    seasonal = np.full(len(y), np.nan)
    seasonal[season - 1 :] = held[: len(y) - season + 1]  # the target's window, a season back
    seasonal = np.where(np.isfinite(seasonal), seasonal, persistence)
    hour = (np.arctan2(x[:, inputs.index("hour_sin")], x[:, inputs.index("hour_cos")])
            / (2 * np.pi) * 24) % 24
    dow = np.round((np.arctan2(x[:, inputs.index("dow_sin")], x[:, inputs.index("dow_cos")])
                    / (2 * np.pi) * 7) % 7)
    first = inputs[0]
    original_x = np.stack([x[:, inputs.index("flow_veh_h")] if name == "traffic"
                           else x[:, inputs.index(first)],
                           x[:, inputs.index("temperature")], dow, hour], axis=1)
    labels = np.append(data.col("anomaly")[1:], 0.0)
    return ModelData(
        name, spec, x[keep], y[keep], split[keep], persistence[keep].astype(np.float32),
        seasonal[keep].astype(np.float32), original_x[keep].astype(np.float32),
        np.nan_to_num(labels[keep]), data.ts_s[keep],
    )


@dataclass
class Trained:
    name: str
    data: ModelData
    graph: Any  # torch.nn.Module ready for export
    output_names: list[str]
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # congestion / anomaly manifest blocks
    training: dict[str, Any] = field(default_factory=dict)


# What each model forecasts, for the gateway's skill guard: (output, window quantity).
FORECASTS: dict[str, tuple[str, str]] = {
    "traffic": ("speed_next", "speed_mean"),
    "energy": ("power_next_w", "power_mean_w"),
}


def input_ranges(x: np.ndarray) -> list[tuple[float, float]]:
    """Per input, the lowest and highest value of the training rows (rounded outwards): the
    gateway flags an input outside this span as extrapolation."""
    lo = np.nanmin(x, axis=0).astype(np.float64)
    hi = np.nanmax(x, axis=0).astype(np.float64)
    return [(math.floor(a * 1e4) / 1e4, math.ceil(b * 1e4) / 1e4)
            for a, b in zip(lo, hi, strict=True)]
