"""``edge-agent model ...``: list, test, verify and train the edge models."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

from models import SAMPLES_DIR, SHIPPED

SAMPLE_TOLERANCE = 1e-3  # relative; expected outputs are stored rounded to 5 decimals


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", help="edge models: list, test, verify, train")
    msub = p.add_subparsers(dest="model_cmd", required=True)

    ls = msub.add_parser("list", help="the shipped models and whether they pass their checks")
    ls.set_defaults(func=cmd_list)

    t = msub.add_parser("test", help="run a model on its shipped sample windows")
    t.add_argument("name", help="model name (traffic, energy)")
    t.add_argument("--path", default="", help="model file to test instead of the shipped one")
    t.add_argument("--samples", default="", help="sample file (default: the shipped samples)")
    t.set_defaults(func=cmd_test)

    v = msub.add_parser("verify", help="check an ONNX file against its manifest")
    v.add_argument("file", help="model .onnx (the manifest is the .json beside it)")
    v.add_argument("--manifest", default="", help="manifest file, if not beside the model")
    v.set_defaults(func=cmd_verify)

    tr = msub.add_parser("train", help="retrain the models (needs the train extra)")
    tr.add_argument("--csv", default="", help="site data CSV (default: the simulated site)")
    tr.add_argument("--tz", default="UTC", help="IANA time zone of the CSV's site")
    tr.add_argument("--out", default="", help="output directory (default: a new ./models-out)")
    tr.add_argument("--models", default="traffic,energy")
    tr.add_argument("--epochs", type=int, default=0, help="epochs (default: the shipped setting)")
    tr.add_argument("--prior", default="auto",
                    help="simulated preset whose year joins a short --csv history as a prior "
                         "(auto: the training site's, under 5 weeks of CSV; none)")
    tr.set_defaults(func=cmd_train)


def cmd_list(args: argparse.Namespace) -> int:
    # numpy and onnxruntime come in with the command that needs them, never with `--help`.
    from models.manifest import ModelError, shipped_paths, verify

    failed = 0
    for name in SHIPPED:
        onnx_path, man_path = shipped_paths(name)
        try:
            vm = verify(onnx_path, man_path)
        except ModelError as exc:
            failed += 1
            print(f"{name:8s} REFUSED  {exc}")
            continue
        m = vm.manifest
        metrics = m.metrics.get("model", {})
        print(f"{name:8s} {m.version}  opset {m.opset}  {len(m.inputs)} inputs -> "
              f"{', '.join(o.name for o in m.outputs)}  window {m.window_s} s  "
              f"{onnx_path.stat().st_size / 1024:.0f} KiB  test MAE {metrics.get('mae')} "
              f"RMSE {metrics.get('rmse')}")
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from models.manifest import ModelError, verify

    try:
        vm = verify(args.file, args.manifest or None)
    except ModelError as exc:
        print(f"REFUSED: {exc}")
        return 1
    m = vm.manifest
    print(f"ok: {m.name} version {m.version}, opset {m.opset}, runs in {vm.runtime}, "
          f"inputs {', '.join(m.input_names)}")
    return 0


def _close(a: float | str, b: Any) -> bool:
    if isinstance(a, str) or b is None:
        return isinstance(a, str) or (isinstance(a, float) and math.isnan(a))
    return abs(a - float(b)) <= SAMPLE_TOLERANCE * max(1.0, abs(float(b)))


def cmd_test(args: argparse.Namespace) -> int:
    import numpy as np

    from agent.config.schema import ModelConfig
    from agent.pipeline.infer import InferenceStage
    from models.windows_io import window_from_dict

    sample_path = Path(args.samples) if args.samples else SAMPLES_DIR / f"{args.name}.json"
    try:
        doc = json.loads(sample_path.read_text(encoding="utf-8"))
        windows = [window_from_dict(w) for w in doc["windows"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: cannot read samples {sample_path}: {exc}")
        return 2
    # The model itself, not what the skill guard would publish at a site.
    stage = InferenceStage([ModelConfig(name=args.name, stream=doc["stream"], path=args.path,
                                        guard=False)])
    try:
        if stage.load_errors:
            print(f"REFUSED: {stage.load_errors[0]}")
            return 1
        t0 = time.perf_counter()
        results = asyncio.run(_replay(stage, windows))
        wall_s = time.perf_counter() - t0
    finally:
        stage.close()
    expected = doc.get("expected", [])
    same_model = not args.path or stage.versions().get(args.name) == doc.get("version")
    mismatches = 0
    if same_model and len(expected) == len(results):
        for got, want in zip(results, expected, strict=True):
            mismatches += sum(not _close(got["outputs"][k], want.get(k)) for k in want)
    lat = np.array([r["latency_ms"] for r in results])
    runtime = stage.status()["models"].get(args.name, {}).get("runtime")
    print(f"{args.name} version {stage.versions().get(args.name)} ({runtime}): {len(windows)} "
          f"sample windows -> {len(results)} inferences in {wall_s:.2f} s")
    for r in results[-3:]:
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r["outputs"].items()}
        print(f"  window {r['start']}: {shown}")
    if len(lat):
        print(f"  latency per run: p50 {np.percentile(lat, 50):.3f} ms, "
              f"p99 {np.percentile(lat, 99):.3f} ms")
    if not same_model:
        print("  (a different model than the samples were made with: outputs not compared)")
        return 0
    if len(expected) != len(results):
        print(f"  FAIL: {len(results)} inferences, the samples expect {len(expected)}")
        return 1
    if mismatches:
        print(f"  FAIL: {mismatches} outputs differ from the expected values")
        return 1
    print("  outputs match the expected values")
    return 0


async def _replay(stage: Any, windows: list[Any]) -> list[dict[str, Any]]:
    out = []
    for w in windows:
        for inf in await stage.on_window(w):
            start = time.strftime("%Y-%m-%d %H:%M", time.gmtime(inf.window_start_ns / 1e9))
            out.append({"start": start + "Z", "outputs": inf.outputs,
                        "latency_ms": inf.latency_ms})
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from models.train import TrainUnavailable, require_torch

    try:
        require_torch()
    except TrainUnavailable as exc:
        print(f"error: {exc}")
        return 1
    from models.train import main as train_main

    argv = ["--out", args.out or str(Path.cwd() / "models-out"), "--models", args.models,
            "--tz", args.tz]
    if args.csv:
        argv += ["--csv", args.csv]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    argv += ["--prior", args.prior]
    return train_main(argv)
