"""The inference stage: stream windows -> feature rows -> ONNX graph -> Inference.

The graph runs in the package's numpy executor (``models.numpy_exec``) when it supports the
graph, else in onnxruntime; a model's ``runtime`` setting chooses one explicitly.

Every window of a model's stream gives one inference (``window_start_ns`` = that window's
start), on the model window of ``window_s`` that ends with it (see ``agent.pipeline.features``): a
gateway with 10 s traffic windows publishes a traffic forecast every 10 s, from the first
window on, with ``inputs_filled`` counting the inputs that still lack history.

Every configured model is verified against its manifest before it runs (sha256, input names and
width against the graph, opset; see ``models.manifest.verify``). A model that fails is refused
with an error naming the file and the reason, and the model that was running keeps running.

Threading: feature building and all per-model state live on the event loop. ``session.run`` of a
model whose load-time p99 is tiny runs there too; a slower model's goes to one worker thread
(each session has one intra-op thread, so inference uses at most one core beside the loop). See
``agent.pipeline.loaded_model`` for the probe; status shows ``runs_on``. The set of loaded
models is one dict that ``reload`` and ``activate`` replace in a single assignment, so a window
is always served by a consistent set.

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
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.schema import ModelConfig
from agent.readings import Inference, Window

if TYPE_CHECKING:
    from agent.pipeline.features import FeatureRow
    from agent.pipeline.loaded_model import LoadedModel
    from agent.pipeline.skill import ShadowComparison, Verdict

log = logging.getLogger(__name__)

ERRORS_KEPT = 20


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
        # Bound when the first model loads (importing them loads numpy); on_window runs per
        # window and an import statement there costs more than its lookups.
        self._feature_errors_type: type[Exception] = ValueError
        self._run_all: Callable[[list[tuple[LoadedModel, FeatureRow]]], list[Any]] | None = None
        self.load_errors = self.reload(models)

    # -- loading -------------------------------------------------------------------------------

    def _load(self, cfg: ModelConfig, path: str, shadow: bool,
              previous: LoadedModel | None) -> LoadedModel:
        from agent.pipeline.loaded_model import load

        return load(cfg, path, shadow, previous)

    def reload(self, models: Sequence[ModelConfig]) -> list[str]:
        """Load the given configs; returns the errors. A model that fails keeps its predecessor."""
        errors: list[str] = []
        current = self._slots
        new: dict[str, _Slot] = {}
        for cfg in models:
            if not cfg.enabled:
                continue
            # numpy and onnxruntime come in here, with the first configured model.
            from agent.pipeline.features import FeatureError
            from agent.pipeline.loaded_model import run_all
            from agent.pipeline.skill import ShadowComparison
            from models.manifest import ModelError

            self._feature_errors_type, self._run_all = FeatureError, run_all

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

    def candidate(self, name: str) -> tuple[Path, Verdict | None] | None:
        """The shadow candidate of ``name`` (its file) and how it scores so far; None if it
        has none."""
        slot = self._slots.get(name)
        if slot is None or slot.candidate is None:
            return None
        verdict = (slot.comparison.verdict(slot.config.activate_margin,
                                           slot.config.activate_min_s)
                   if slot.comparison is not None else None)
        return slot.candidate.model.path, verdict

    # -- running -------------------------------------------------------------------------------

    async def on_window(self, w: Window) -> list[Inference]:
        """Feed a window of any stream; returns one inference per model (and shadow) of its
        stream, on the model window ending with it."""
        slots = self._slots
        run_all = self._run_all
        if not slots or run_all is None:
            return []
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
                except self._feature_errors_type as exc:
                    self._feature_error(m, str(exc))
                    continue
                if row is not None:
                    jobs.append((m, row))
        if not jobs:
            return []
        # Models measured as tiny at load run here on the loop; the others go to the worker in
        # one hop. Results keep the order of the jobs.
        worker = [j for j in jobs if j[0].runs_on == "worker"]
        slow = iter(await asyncio.get_running_loop().run_in_executor(
            self._executor, run_all, worker) if worker else ())
        results = [next(slow) if m.runs_on == "worker" else run_all([(m, row)])[0]
                   for m, row in jobs]
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
        from agent.pipeline.loaded_model import forecast_of

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
            from agent.pipeline.features import (
                ENERGY_QUANTITIES,
                TRAFFIC_QUANTITIES,
                parse_input,
            )

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
                from models.manifest import manifest_path_for

                for p in (m.model.path, manifest_path_for(m.model.path)):
                    try:
                        out[p] = p.stat().st_mtime_ns
                    except OSError:
                        out[p] = -1
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True)
