"""The inference stage: stream windows -> feature rows -> ONNX graph -> Inference.

The graph runs in onnxruntime where it is installed, else in the numpy executor
(``models.numpy_exec``); a model's ``runtime`` setting chooses one explicitly.

Every window of a model's stream gives one inference (``window_start_ns`` = that window's
start), on the model window of ``window_s`` that ends with it (see ``agent.pipeline.features``): a
gateway with 10 s traffic windows publishes a traffic forecast every 10 s, from the first
window on, with ``inputs_filled`` counting the inputs that still lack history.

Every configured model is verified against its manifest before it runs (sha256, input names and
width against the graph, opset; see ``models.manifest.verify``). A model that fails is refused
with an error naming the file and the reason, and the model that was running keeps running.

Threading: feature building and all per-model state live on the event loop; only
``session.run`` goes to one worker thread (each session has one intra-op thread, so inference
uses at most one core beside the loop). The set of loaded models is one dict that ``reload`` and
``activate`` replace in a single assignment, so a window is always served by a consistent set.

Skill guard (``agent.pipeline.skill``): each model's forecast output is scored against what
the next window measured, beside persistence; what gets published under the output's name is
the model's value (``source = "model"``), persistence (``"fallback"``) or persistence plus a
clipped part of the model's move (``"blend"``), and the model's own value goes out as
``<output>_model``. Inputs outside the span of the training data are named in
``out_of_range``.

Shadow mode: a model configured with ``shadow = "candidate.onnx"`` runs the candidate beside the
active model on the same windows; both results are returned (the candidate's with
``shadow=True``) until ``activate(name)`` promotes the candidate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.config.schema import ModelConfig
from agent.pipeline.features import (
    ENERGY_QUANTITIES,
    TRAFFIC_QUANTITIES,
    FeatureBuilder,
    FeatureError,
    FeatureRow,
    FeatureSpec,
    InputSpec,
    parse_input,
)
from agent.pipeline.skill import GuardSettings, ShadowComparison, SkillGuard, Source
from agent.readings import Inference, Window
from models.manifest import (
    Forecast,
    Manifest,
    ModelError,
    VerifiedModel,
    manifest_path_for,
    shipped_paths,
    verify,
)

log = logging.getLogger(__name__)

ERRORS_KEPT = 20
FORECASTS_KEPT = 4096  # pending anomaly forecasts: one per stream window over one model window


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

    def __post_init__(self) -> None:
        m = self.manifest
        names = m.input_names
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

    def run(self, row: FeatureRow) -> tuple[list[np.ndarray], float]:
        """Blocking; on the worker thread. Returns the output arrays and the latency (ms)."""
        m = self.manifest
        t0 = time.perf_counter()
        names = [o.name for o in m.outputs]
        out = self.model.session.run(names, {m.input_tensor: row.values[None]})
        return [np.asarray(o) for o in out], (time.perf_counter() - t0) * 1000

    def outputs(self, row: FeatureRow, raw: list[np.ndarray]) -> dict[str, float | str]:
        """Named outputs plus class labels and the anomaly score; on the event loop."""
        m = self.manifest
        out: dict[str, float | str] = {}
        for spec, arr in zip(m.outputs, raw, strict=True):
            value = float(arr.reshape(-1)[0])
            out[spec.name] = value
            if spec.labels:
                out[label_key(spec.name)] = spec.labels[min(max(round(value), 0),
                                                            len(spec.labels) - 1)]
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
        }


class ActivationRefused(ValueError):
    """The candidate has not shown on live windows that it does better; the message says how
    it scored."""


@dataclass(frozen=True)
class _Slot:
    config: ModelConfig
    active: LoadedModel
    candidate: LoadedModel | None = None
    comparison: ShadowComparison | None = None


class InferenceStage:
    """Runs the configured models on the windows of their streams."""

    def __init__(self, models: Sequence[ModelConfig] = ()) -> None:
        self._slots: dict[str, _Slot] = {}
        self._errors: deque[str] = deque(maxlen=ERRORS_KEPT)
        self._feature_errors: dict[str, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-infer")
        self.load_errors = self.reload(models)

    # -- loading -------------------------------------------------------------------------------

    def _load(self, cfg: ModelConfig, path: str, shadow: bool,
              previous: LoadedModel | None) -> LoadedModel:
        verified = verify(resolve(cfg, path), runtime=cfg.runtime)
        spec = feature_spec(verified.manifest)
        if previous is not None and previous.version == verified.version \
                and previous.builder.spec == spec and previous.stream == cfg.stream:
            # The same file again: keep the running one (and its feature history).
            previous.shadow = shadow
            return previous
        return LoadedModel(cfg.name, cfg.stream, verified, FeatureBuilder(spec), shadow,
                           guard=SkillGuard(guard_settings(cfg)))

    def reload(self, models: Sequence[ModelConfig]) -> list[str]:
        """Load the given configs; returns the errors. A model that fails keeps its predecessor."""
        errors: list[str] = []
        current = self._slots
        new: dict[str, _Slot] = {}
        for cfg in models:
            if not cfg.enabled:
                continue
            old = current.get(cfg.name)
            try:
                active = self._load(cfg, cfg.path, False, old.active if old else None)
            except (ModelError, FeatureError) as exc:
                errors.append(f"model {cfg.name!r}: {exc}")
                if old is None:
                    continue
                active = old.active
                errors[-1] += f"; still running version {active.version}"
            candidate = None
            if cfg.shadow:
                try:
                    candidate = self._load(cfg, cfg.shadow, True, old.candidate if old else None)
                except (ModelError, FeatureError) as exc:
                    errors.append(f"model {cfg.name!r} shadow: {exc}")
                    candidate = old.candidate if old else None
            comparison = None
            if candidate is not None:
                same = old is not None and old.candidate is candidate and old.active is active
                comparison = old.comparison if same and old is not None else None
                comparison = comparison or ShadowComparison(cfg.guard_horizon_s)
            new[cfg.name] = _Slot(cfg, active, candidate, comparison)
        self._slots = new  # the switch: one reference assignment
        for e in errors:
            log.error("%s", e)
            self._errors.append(e)
        return errors

    def activate(self, name: str, *, force: bool = False) -> str:
        """Promote the shadow candidate of ``name`` to active (atomically), if it beat the
        active model and persistence on the live windows (``force``: whatever it scored).
        Returns how it scored; raises ``ActivationRefused`` with the numbers otherwise."""
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"no model named {name!r} is loaded")
        if slot.candidate is None:
            raise ValueError(f"model {name!r} has no shadow candidate to activate")
        verdict = (slot.comparison.verdict(slot.config.activate_margin,
                                           slot.config.activate_min_s)
                   if slot.comparison is not None else None)
        reason = verdict.reason if verdict is not None else "not scored"
        if not force and (verdict is None or not verdict.ok):
            log.warning("model %s: activation of %s refused: %s", name,
                        slot.candidate.version, reason)
            raise ActivationRefused(f"model {name!r}: activation refused: {reason}")
        promoted = slot.candidate
        promoted.shadow = False
        cfg = slot.config.model_copy(update={"path": str(promoted.model.path), "shadow": ""})
        self._slots = {**self._slots, name: _Slot(cfg, promoted, None)}
        log.info("model %s: activated version %s (was %s)%s: %s", name, promoted.version,
                 slot.active.version, " by force" if force else "", reason)
        return reason

    # -- running -------------------------------------------------------------------------------

    async def on_window(self, w: Window) -> list[Inference]:
        """Feed a window of any stream; returns one inference per model (and shadow) of its
        stream, on the model window ending with it."""
        slots = self._slots
        jobs: list[tuple[LoadedModel, FeatureRow]] = []
        for slot in slots.values():
            for m in (slot.active, slot.candidate):
                if m is None:
                    continue
                if m.stream != w.stream:
                    m.builder.observe(w)
                    continue
                try:
                    row = m.builder.push(w)
                except FeatureError as exc:
                    self._feature_error(m, str(exc))
                    continue
                if row is not None:
                    jobs.append((m, row))
        if not jobs:
            return []
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, _run_all, jobs)
        out: list[Inference] = []
        done: dict[int, tuple[FeatureRow, dict[str, float | str]]] = {}
        for (m, row), result in zip(jobs, results, strict=True):
            if isinstance(result, Exception):
                m.failures += 1
                msg = f"model {m.name!r} version {m.version}: run failed: {result}"
                log.warning("%s", msg)
                self._errors.append(msg)
                continue
            raw, latency_ms = result
            outputs = m.outputs(row, raw)
            m.runs += 1
            m.last_outputs, m.last_latency_ms = outputs, latency_ms
            m.last_window_start_ns, m.last_missing = w.start_ns, row.missing
            out.append(Inference(m.name, m.version, w.start_ns, outputs, latency_ms,
                                 w.stream, m.shadow, m.last_source, m.guard.skill,
                                 m.out_of_range(row)))
            done[id(m)] = (row, outputs)
        for slot in slots.values():
            if slot.comparison is not None and slot.candidate is not None:
                self._compare(slot, done)
        return out

    @staticmethod
    def _compare(slot: _Slot, done: dict[int, tuple[FeatureRow, dict[str, float | str]]]) -> None:
        """Score the candidate beside the active model on the window both just saw."""
        assert slot.comparison is not None and slot.candidate is not None
        fc = forecast_of(slot.active.manifest)
        a, c = done.get(id(slot.active)), done.get(id(slot.candidate))
        if fc is None or a is None or c is None or a[0].end_ns != c[0].end_ns:
            return
        row = a[0]
        key = f"{fc.output}_model"
        active, cand = a[1].get(key, a[1].get(fc.output)), c[1].get(key, c[1].get(fc.output))
        persistence = slot.active.persistence(row)
        if not isinstance(active, float) or not isinstance(cand, float) or persistence is None:
            return
        slot.comparison.observe(row.end_ns, row.current.get(fc.actual, math.nan))
        slot.comparison.forecast(row.end_ns + (row.end_ns - row.start_ns), cand, active,
                                 persistence)

    def _feature_error(self, m: LoadedModel, msg: str) -> None:
        m.failures += 1
        key = f"{m.name}:{m.version}"
        if self._feature_errors.get(key) != msg:
            self._feature_errors[key] = msg
            log.error("model %s: %s", m.name, msg)
            self._errors.append(f"model {m.name!r}: {msg}")

    def status(self) -> dict[str, Any]:
        return {
            "models": {
                name: {**s.active.status(),
                       "shadow": {**s.candidate.status(),
                                  "comparison": s.comparison.status() if s.comparison else None}
                       if s.candidate else None}
                for name, s in self._slots.items()
            },
            "errors": list(self._errors),
        }

    def last_persistence(self, name: str) -> float | None:
        """Persistence's forecast beside the active model's latest one (for evaluation)."""
        slot = self._slots.get(name)
        return slot.active.last_persistence if slot is not None else None

    def history_streams(self) -> tuple[set[str], set[str], int]:
        """The streams whose windows give traffic and energy inputs, and the model window (s):
        what a history of model windows records."""
        traffic: set[str] = set()
        energy: set[str] = set()
        window_s = 0
        for slot in self._slots.values():
            m = slot.active.manifest
            bases = {parse_input(i.name)[0] for i in m.inputs}
            if bases & set(TRAFFIC_QUANTITIES):
                traffic.add(slot.active.stream)
            if bases & set(ENERGY_QUANTITIES):
                energy.add(slot.active.stream)
            window_s = window_s or m.window_s
        return traffic, energy, window_s

    def versions(self) -> dict[str, str]:
        return {name: s.active.version for name, s in self._slots.items()}

    def files(self) -> dict[Path, int]:
        """The model and manifest files in use with their mtimes (ns; -1 if gone), so a watcher
        can notice a new file."""
        out: dict[Path, int] = {}
        for slot in self._slots.values():
            for m in (slot.active, slot.candidate):
                if m is None:
                    continue
                for p in (m.model.path, manifest_path_for(m.model.path)):
                    try:
                        out[p] = p.stat().st_mtime_ns
                    except OSError:
                        out[p] = -1
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _run_all(
    jobs: list[tuple[LoadedModel, FeatureRow]],
) -> list[tuple[list[np.ndarray], float] | Exception]:
    out: list[tuple[list[np.ndarray], float] | Exception] = []
    for m, row in jobs:
        try:
            out.append(m.run(row))
        except Exception as exc:  # a runtime's error types need not be exported
            out.append(exc)
    return out
