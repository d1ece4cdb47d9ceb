"""One loaded model: verified file, feature history, run statistics, skill guard, and where its
``session.run`` goes.

Importing this module brings in numpy and onnxruntime (through ``models.manifest``), so
``agent.pipeline.infer`` imports it only once a model is configured: an agent with no models
never loads either.

Where a model runs is measured when it is loaded: ``PROBE_RUNS`` runs on the manifest's fill
values, and a model whose 90th percentile ``session.run`` is under ``INLINE_MS`` runs on the
event loop (the hop to the worker thread and back costs more than the run itself); a slower one
keeps the worker, so a large model never stalls acquisition. The decision reads the 90th
percentile, not the slowest runs: on a busy machine a run the scheduler interrupted says
nothing about the model, and one such run in a short probe sent a 20 us model to the worker.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.config.schema import ModelConfig
from agent.pipeline.features import FeatureBuilder, FeatureRow, FeatureSpec, InputSpec
from agent.pipeline.skill import GuardSettings, SkillGuard, Source
from models.manifest import Forecast, Manifest, VerifiedModel, shipped_paths, verify

FORECASTS_KEPT = 4096  # pending anomaly forecasts: one per stream window over one model window
# A run this short blocks the loop less than a thread hop costs (~0.1-5 ms on a busy Pi-class
# machine); anything slower goes to the worker so acquisition never waits on a model.
INLINE_MS = 0.5
PROBE_WARMUP_RUNS = 3
PROBE_RUNS = 100

log = logging.getLogger(__name__)

RunsOn = Literal["loop", "worker"]


def feature_spec(m: Manifest) -> FeatureSpec:
    return FeatureSpec(
        inputs=tuple(InputSpec(i.name, i.fill) for i in m.inputs),
        window_s=m.window_s, timezone=m.timezone, hold_s=dict(m.hold_s),
    )


def guard_settings(cfg: ModelConfig) -> GuardSettings:
    return GuardSettings(horizon_s=cfg.guard_horizon_s, margin=cfg.guard_margin,
                         min_evaluated_s=cfg.guard_min_s, enabled=cfg.guard)


def forecast_of(m: Manifest) -> Forecast | None:
    """The forecast the guard scores: declared, or (older manifests) the anomaly's pair."""
    if m.forecast is not None:
        return m.forecast
    if m.anomaly is not None:
        return Forecast(output=m.anomaly.forecast, actual=m.anomaly.actual)
    return None


def label_key(output: str) -> str:
    """Where a class-index output's label goes: ``congestion_level`` -> ``congestion``."""
    return output.removesuffix("_level") if output.endswith("_level") else f"{output}_label"


def level_of(speed: float, m: Manifest) -> int:
    """The congestion class of a speed by the manifest's thresholds (0 free .. 2 congested)."""
    c = m.congestion
    if c is None or not math.isfinite(speed):
        return 0
    ratio = speed / c.free_flow_speed_m_s
    return 2 if ratio < c.congested_below else 1 if ratio < c.slowing_below else 0


def resolve(cfg: ModelConfig, path: str) -> Path:
    """The ONNX file for a config path ("" = the model shipped under the config's name)."""
    return shipped_paths(cfg.name)[0] if not path else Path(path)


@dataclass
class LoadedModel:
    """One verified model with its own feature history and run statistics."""

    name: str
    stream: str
    model: VerifiedModel
    builder: FeatureBuilder
    shadow: bool = False
    runs: int = 0
    failures: int = 0
    last_outputs: dict[str, float | str] = field(default_factory=dict)
    last_latency_ms: float = math.nan
    last_window_start_ns: int = 0
    last_missing: tuple[str, ...] = ()
    # (end of the model window it is for, value): what the anomaly score compares against.
    forecasts: deque[tuple[int, float]] = field(
        default_factory=lambda: deque(maxlen=FORECASTS_KEPT))
    guard: SkillGuard = field(default_factory=SkillGuard)
    last_source: Source = "model"
    last_persistence: float | None = None
    last_out_of_range: tuple[str, ...] = ()
    out_of_range_windows: int = 0
    runs_on: RunsOn = "worker"
    probe_p90_ms: float = math.nan
    probe_p99_ms: float = math.nan

    def __post_init__(self) -> None:
        m = self.manifest
        names = m.input_names
        self._output_names = [o.name for o in m.outputs]
        self._named_outputs = [(o.name, o.labels, label_key(o.name)) for o in m.outputs]
        self._input = m.input_tensor
        self._forecast = forecast_of(m)
        self._actual_index = (names.index(self._forecast.actual)
                              if self._forecast is not None and self._forecast.actual in names
                              else None)
        self._ranged = [(i, e.name, e.range[0], e.range[1])
                        for i, e in enumerate(m.inputs) if e.range is not None]

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def version(self) -> str:
        return self.model.version

    def probe(self) -> None:
        """Time ``session.run`` on the manifest's fill values and choose where it runs."""
        fills = np.array([i.fill for i in self.manifest.inputs], dtype=np.float32)
        row = FeatureRow(0, 0, fills, (), {})
        for _ in range(PROBE_WARMUP_RUNS):
            self.run(row)
        times = []
        for _ in range(PROBE_RUNS):
            t0 = time.perf_counter()
            self.run(row)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        self.probe_p90_ms = times[math.ceil(0.90 * len(times)) - 1]
        self.probe_p99_ms = times[math.ceil(0.99 * len(times)) - 1]
        self.runs_on = "loop" if self.probe_p90_ms <= INLINE_MS else "worker"

    def run(self, row: FeatureRow) -> tuple[list[np.ndarray], float]:
        """Blocking; on the worker thread. Returns the output arrays and the latency (ms)."""
        t0 = time.perf_counter()
        out = self.model.session.run(self._output_names, {self._input: row.values[None]})
        return [np.asarray(o) for o in out], (time.perf_counter() - t0) * 1000

    def outputs(self, row: FeatureRow, raw: list[np.ndarray]) -> dict[str, float | str]:
        """Named outputs plus class labels and the anomaly score; on the event loop."""
        m = self.manifest
        out: dict[str, float | str] = {}
        for (name, labels, key), arr in zip(self._named_outputs, raw, strict=True):
            value = float(arr.item(0))
            out[name] = value
            if labels:
                out[key] = labels[min(max(round(value), 0), len(labels) - 1)]
        if m.anomaly is not None:
            actual = row.current.get(m.anomaly.actual, math.nan)
            pending = self.forecasts
            while pending and pending[0][0] < row.end_ns:
                pending.popleft()
            if pending and pending[0][0] == row.end_ns and math.isfinite(actual):
                score = abs(actual - pending[0][1]) / m.anomaly.scale
                out["anomaly_score"] = score
                out["anomaly"] = 1.0 if score > m.anomaly.threshold else 0.0
            nxt = out.get(m.anomaly.forecast)
            if isinstance(nxt, float):
                pending.append((row.end_ns + row.end_ns - row.start_ns, nxt))
        out["inputs_filled"] = float(len(row.missing))
        self._guarded(row, out)
        return out

    def _guarded(self, row: FeatureRow, out: dict[str, float | str]) -> None:
        """Score the earlier forecasts for this window and choose what to publish now."""
        fc = self._forecast
        self.last_source = "model"
        if fc is None or self._actual_index is None:
            return
        model = out.get(fc.output)
        if not isinstance(model, float):
            return
        self.guard.observe(row.end_ns, row.current.get(fc.actual, math.nan))
        persistence = float(row.values[self._actual_index])
        self.last_persistence = persistence
        target = row.end_ns + (row.end_ns - row.start_ns)
        published, source = self.guard.forecast(target, model, persistence)
        self.last_source = source
        out[f"{fc.output}_model"] = model
        out[fc.output] = published
        c = self.manifest.congestion
        if source != "model" and c is not None and c.output in out:
            spec = next(o for o in self.manifest.outputs if o.name == c.output)
            level = level_of(published, self.manifest)
            out[c.output] = float(level)
            if spec.labels:
                out[label_key(c.output)] = spec.labels[min(level, len(spec.labels) - 1)]

    def persistence(self, row: FeatureRow) -> float | None:
        """Persistence's forecast for the next window: the (held) current value."""
        if self._actual_index is None:
            return None
        return float(row.values[self._actual_index])

    def out_of_range(self, row: FeatureRow) -> tuple[str, ...]:
        """Measured inputs (not filled ones) outside the span of the training data."""
        if not self._ranged:
            return ()
        values, missing = row.values, row.missing
        flagged = tuple(name for i, name, lo, hi in self._ranged
                        if not lo <= float(values[i]) <= hi and name not in missing)
        if flagged:
            self.out_of_range_windows += 1
        self.last_out_of_range = flagged
        return flagged

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version, "path": str(self.model.path), "stream": self.stream,
            "runtime": self.model.runtime,
            "opset": self.manifest.opset, "runs": self.runs, "failures": self.failures,
            "last_window_start_ns": self.last_window_start_ns,
            "window_s": self.manifest.window_s,
            # What the forecast output is scored against, and its value in the last window.
            "forecast_output": self._forecast.output if self._forecast is not None else None,
            "last_actual": self.last_persistence,
            "last_latency_ms": None if math.isnan(self.last_latency_ms)
            else round(self.last_latency_ms, 3),
            "last_outputs": dict(self.last_outputs), "inputs_filled": list(self.last_missing),
            "guard": {**self.guard.status(), "last_source": self.last_source},
            "out_of_range": list(self.last_out_of_range),
            "out_of_range_windows": self.out_of_range_windows,
            # Where session.run goes, from its p90 on the manifest's fill values at load time.
            "runs_on": self.runs_on,
            "probe_p90_ms": None if math.isnan(self.probe_p90_ms)
            else round(self.probe_p90_ms, 3),
            "probe_p99_ms": None if math.isnan(self.probe_p99_ms)
            else round(self.probe_p99_ms, 3),
        }


def load(cfg: ModelConfig, path: str, shadow: bool, previous: LoadedModel | None) -> LoadedModel:
    """Verify a model file and make it runnable; the same file as ``previous`` keeps
    ``previous`` (and its feature history)."""
    verified = verify(resolve(cfg, path), runtime=cfg.runtime)
    spec = feature_spec(verified.manifest)
    if previous is not None and previous.version == verified.version \
            and previous.builder.spec == spec and previous.stream == cfg.stream:
        previous.shadow = shadow
        return previous
    model = LoadedModel(cfg.name, cfg.stream, verified, FeatureBuilder(spec), shadow,
                        guard=SkillGuard(guard_settings(cfg)))
    try:
        model.probe()
    except Exception as exc:  # a runtime's error types need not be exported
        # A model that cannot run on its own fill values still loads (as before); its
        # failures are counted per window, on the worker.
        log.warning("model %s: a run on its fill values failed (%s); it runs on the worker",
                    cfg.name, exc)
        model.runs_on = "worker"
    return model


def run_all(
    jobs: list[tuple[LoadedModel, FeatureRow]],
) -> list[tuple[list[np.ndarray], float] | Exception]:
    out: list[tuple[list[np.ndarray], float] | Exception] = []
    for m, row in jobs:
        try:
            out.append(m.run(row))
        except Exception as exc:  # a runtime's error types need not be exported
            out.append(exc)
    return out
