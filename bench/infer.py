"""Inference latency per model: the whole stage beside bare onnxruntime, in the same run.

    python bench/infer.py [--rounds 20]

For each shipped model the sample windows (300 s) are replayed ``rounds`` times (shifted in time
so the stream runs on), once as they are and once split into the stream windows a gateway
produces (10 s traffic, 60 s energy), through ``InferenceStage.on_window`` with the default
config (``runtime = "auto"``: the package's numpy executor for these graphs). That is the
stage: what the agent does per window to produce an inference (sliding feature roll-up, the
graph run on the loop or on the worker as the load-time probe chose, outputs, skill guard,
range check, the ``Inference``).

The baseline is a bare onnxruntime ``session.run`` (one intra-op thread, the agent's session
options) on the same feature rows, whatever runtime the stage uses; the executor's own bare
``run`` on those rows is printed beside it, and so are the feature builder alone and the floor
of bare push + run. Ratios are p99 over p99. The skill guard's worst case is timed alone too: a
forecaster it trusts on every move, so every forecast goes through the error budget. All
figures are per window.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config.schema import ModelConfig
from agent.pipeline.features import FeatureBuilder
from agent.pipeline.infer import InferenceStage
from agent.pipeline.loaded_model import feature_spec
from agent.pipeline.skill import GuardSettings, SkillGuard
from agent.readings import Window
from models import SAMPLES_DIR, SHIPPED
from models.manifest import load_manifest, session_options, shipped_paths
from models.numpy_exec import NumpySession
from models.windows_io import split_window, window_from_dict

STREAM_WINDOW_S = {"traffic": 10, "energy": 60}


def windows_for(name: str, rounds: int, window_s: int) -> tuple[str, list[Window]]:
    doc = json.loads((SAMPLES_DIR / f"{name}.json").read_text())
    base = [window_from_dict(w) for w in doc["windows"]]
    span = base[-1].end_ns - base[0].start_ns
    out = []
    for r in range(rounds):
        for w in base:
            shifted = dataclasses.replace(w, start_ns=w.start_ns + r * span,
                                          end_ns=w.end_ns + r * span)
            out.extend(split_window(shifted, 300 // window_s))
    return doc["stream"], out


def pct(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50) * 1000:7.1f} us  p99 {np.percentile(ms, 99) * 1000:7.1f} us"


def p99(ms: list[float]) -> float:
    return float(np.percentile(ms, 99))


async def bench_stage(name: str, stream: str, windows: list[Window]
                      ) -> tuple[list[float], list[float], int, str]:
    """(per on_window call, per session.run as the stage reports it, inferences, where and in
    which runtime it ran)"""
    stage = InferenceStage([ModelConfig(name=name, stream=stream)])
    times: list[float] = []
    reported: list[float] = []
    try:
        for w in windows:
            t0 = time.perf_counter()
            result = await stage.on_window(w)
            times.append((time.perf_counter() - t0) * 1000)
            reported.extend(i.latency_ms for i in result)
        st = stage.status()["models"][name]
        runs_on = f"{st['runtime']} on the {st['runs_on']}"
    finally:
        stage.close()
    return times, reported, len(reported), runs_on


def bench_bare(name: str, windows: list[Window]
               ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(per builder.push, per bare onnxruntime session.run on the rows it gave, per window push
    + that run, per bare numpy executor run on the same rows)"""
    onnx_path, man_path = shipped_paths(name)
    m = load_manifest(man_path)
    builder = FeatureBuilder(feature_spec(m))
    rows, build = [], []
    for w in windows:
        t0 = time.perf_counter()
        r = builder.push(w)
        build.append((time.perf_counter() - t0) * 1000)
        if r is not None:
            rows.append((len(build) - 1, r.values[None]))
    sess = ort.InferenceSession(str(onnx_path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in m.outputs]
    times = []
    whole = list(build)
    for i, x in rows:
        t0 = time.perf_counter()
        sess.run(names, {m.input_tensor: x})
        times.append((time.perf_counter() - t0) * 1000)
        whole[i] += times[-1]
    executor = NumpySession.from_path(onnx_path)
    ours = []
    for _, x in rows:
        t0 = time.perf_counter()
        executor.run(names, {m.input_tensor: x})
        ours.append((time.perf_counter() - t0) * 1000)
    return build, times, whole, ours


def bench_guard(n: int, window_s: int) -> list[float]:
    """Per forecast: ``SkillGuard.observe`` + ``forecast`` at this cadence (300 s model window),
    on a random walk with a perfect forecaster, so every move is trusted and budgeted."""
    ns, model_ns = window_s * 10**9, 300 * 10**9
    ahead = 300 // window_s
    rng = np.random.default_rng(0)
    actual = 100.0 + np.cumsum(rng.normal(0.0, 1.0, n + ahead))
    guard = SkillGuard(GuardSettings(min_evaluated_s=0.0))
    t_base = 1_740_000_000 * 10**9
    times = []
    for k in range(n):
        end = t_base + (k + 1) * ns
        t0 = time.perf_counter()
        guard.observe(end, float(actual[k]))
        guard.forecast(end + model_ns, float(actual[k + ahead]), float(actual[k]))
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, one intra-op thread; {args.rounds} replays of the "
          "sample windows")
    for name in SHIPPED:
        size = shipped_paths(name)[0].stat().st_size
        for window_s in (300, STREAM_WINDOW_S[name]):
            stream, windows = windows_for(name, args.rounds, window_s)
            build, bare, floor, executor = bench_bare(name, windows)
            staged, reported, runs, runs_on = asyncio.run(bench_stage(name, stream, windows))
            print(f"{name:8s} {window_s:3d} s windows ({len(windows)} windows -> {runs} "
                  f"inferences, {size / 1024:.0f} KiB, runs in {runs_on})")
            print(f"  bare session.run        {pct(bare)}  (onnxruntime: the baseline)")
            print(f"  bare executor run       {pct(executor)}  = "
                  f"{p99(executor) / p99(bare):4.1f} x bare session.run")
            print(f"  feature builder push    {pct(build)}")
            print(f"  bare push + run         {pct(floor)}")
            print(f"  stage: graph run        {pct(reported)}  = "
                  f"{p99(reported) / p99(bare):4.1f} x bare session.run")
            print(f"  stage: whole on_window  {pct(staged)}  = {p99(staged) / p99(floor):4.1f} x "
                  f"bare push + run, {p99(staged) / p99(bare):4.1f} x bare session.run")
            print(f"  guard alone, worst case {pct(bench_guard(len(windows), window_s))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
