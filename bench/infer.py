"""Inference latency per model: the whole stage beside bare onnxruntime, in the same run.

    python bench/infer.py [--rounds 20]

For each shipped model the sample windows are replayed ``rounds`` times (shifted in time so the
stream runs on) through ``InferenceStage.on_window`` (feature roll-up, the hop to the worker
thread, ``session.run``, post-processing), and the same feature rows go straight into an
onnxruntime session with the same options (one intra-op thread). Both are timed per window.
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

from agent.config import ModelConfig
from agent.features import FeatureBuilder
from agent.infer import InferenceStage, feature_spec
from models import SAMPLES_DIR, SHIPPED
from models.manifest import load_manifest, session_options, shipped_paths
from models.windows_io import window_from_dict

NS = 1_000_000_000


def windows_for(name: str, rounds: int) -> tuple[str, list]:
    doc = json.loads((SAMPLES_DIR / f"{name}.json").read_text())
    base = [window_from_dict(w) for w in doc["windows"]]
    span = base[-1].end_ns - base[0].start_ns
    out = []
    for r in range(rounds):
        for w in base:
            out.append(dataclasses.replace(w, start_ns=w.start_ns + r * span,
                                           end_ns=w.end_ns + r * span))
    return doc["stream"], out


def pct(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50) * 1000:7.1f} us  p99 {np.percentile(ms, 99) * 1000:7.1f} us"


async def bench_stage(name: str, stream: str, windows: list) -> tuple[list[float], list[float]]:
    """(per on_window call, per session.run as the stage reports it in Inference.latency_ms)"""
    stage = InferenceStage([ModelConfig(name=name, stream=stream)])
    times, reported = [], []
    try:
        for w in windows:
            t0 = time.perf_counter()
            result = await stage.on_window(w)
            times.append((time.perf_counter() - t0) * 1000)
            reported.extend(i.latency_ms for i in result)
    finally:
        stage.close()
    return times, reported


def bench_bare(name: str, windows: list) -> list[float]:
    onnx_path, man_path = shipped_paths(name)
    m = load_manifest(man_path)
    builder = FeatureBuilder(feature_spec(m))
    rows = [r.values[None] for w in windows if (r := builder.push(w)) is not None]
    sess = ort.InferenceSession(str(onnx_path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in m.outputs]
    times = []
    for x in rows:
        t0 = time.perf_counter()
        sess.run(names, {m.input_tensor: x})
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, one intra-op thread; {args.rounds} replays of the "
          "sample windows")
    for name in SHIPPED:
        stream, windows = windows_for(name, args.rounds)
        bare = bench_bare(name, windows)
        staged, reported = asyncio.run(bench_stage(name, stream, windows))
        size = shipped_paths(name)[0].stat().st_size
        print(f"{name:8s} ({len(windows)} windows, {size / 1024:.0f} KiB)")
        print(f"  bare session.run        {pct(bare)}")
        print(f"  stage: run on worker    {pct(reported)}")
        print(f"  stage: whole on_window  {pct(staged)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
