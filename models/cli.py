"""``edge-agent model ...``: list, test, verify and train the edge models."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

from agent import jsontext
from models import SAMPLES_DIR, SHIPPED

SAMPLE_TOLERANCE = 1e-3  # relative; expected outputs are stored rounded to 5 decimals


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", help="edge models: list, test, verify, train")
    msub = p.add_subparsers(dest="model_cmd", required=True)

    ls = msub.add_parser("list", help="the shipped models and whether they pass their checks "
                                      "(manifest and sample windows); exit 1 if one fails")
    ls.add_argument("--json", action="store_true", help="print one object per model as JSON")
    ls.set_defaults(func=cmd_list)

    t = msub.add_parser("test", help="run a model on its shipped sample windows")
    t.add_argument("name", help="model name (traffic, energy)")
    t.add_argument("--path", default="", help="model file to test instead of the shipped one")
    t.add_argument("--samples", default="", help="sample file (default: the shipped samples)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_test)

    v = msub.add_parser("verify", help="check an ONNX file against its manifest")
    v.add_argument("file", help="model .onnx (the manifest is the .json beside it)")
    v.add_argument("--manifest", default="", help="manifest file, if not beside the model")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
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

    rows: list[dict[str, Any]] = []
    for name in SHIPPED:
        onnx_path, man_path = shipped_paths(name)
        try:
            vm = verify(onnx_path, man_path)
        except ModelError as exc:
            rows.append({"name": name, "ok": False, "verified": False, "error": str(exc)})
            continue
        m = vm.manifest
        metrics = m.metrics.get("model", {})
        checked = run_samples(name, "", "")
        rows.append({
            "name": name, "ok": checked["ok"], "verified": True, "version": m.version,
            "opset": m.opset, "inputs": len(m.inputs), "outputs": [o.name for o in m.outputs],
            "window_s": m.window_s, "size_bytes": onnx_path.stat().st_size,
            "test_mae": metrics.get("mae"), "test_rmse": metrics.get("rmse"),
            "samples": checked.get("summary"), "error": checked.get("error")})
    if args.json:
        print(jsontext.dumps(rows, indent=2))
    for r in rows:
        if args.json:
            break
        if not r["verified"]:
            print(f"{r['name']:8s} REFUSED  {r['error']}")
            continue
        verdict = "PASS" if r["ok"] else "FAIL"
        print(f"{r['name']:8s} {verdict}  {r['version']}  opset {r['opset']}  {r['inputs']} "
              f"inputs -> {', '.join(r['outputs'])}  window {r['window_s']} s  "
              f"{r['size_bytes'] / 1024:.0f} KiB  test MAE {r['test_mae']} RMSE {r['test_rmse']}")
        if not r["ok"]:
            print(f"         {r['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from models.manifest import ModelError, verify

    try:
        vm = verify(args.file, args.manifest or None)
    except ModelError as exc:
        if args.json:
            print(jsontext.dumps({"ok": False, "file": args.file, "error": str(exc)}))
        else:
            print(f"REFUSED: {exc}")
        return 1
    m = vm.manifest
    if args.json:
        print(jsontext.dumps({"ok": True, "file": args.file, "name": m.name,
                              "version": m.version, "opset": m.opset, "runtime": vm.runtime,
                              "inputs": list(m.input_names)}))
        return 0
    print(f"ok: {m.name} version {m.version}, opset {m.opset}, runs in {vm.runtime}, "
          f"inputs {', '.join(m.input_names)}")
    return 0


def _close(a: float | str, b: Any) -> bool:
    if isinstance(a, str) or b is None:
        return isinstance(a, str) or (isinstance(a, float) and math.isnan(a))
    return abs(a - float(b)) <= SAMPLE_TOLERANCE * max(1.0, abs(float(b)))


def run_samples(name: str, path: str, samples: str) -> dict[str, Any]:
    """Model ``name`` (or the file ``path``) on its sample windows: ``ok``, what ran, the
    last outputs, latency, and ``error`` saying why it did not pass."""
    import numpy as np

    from agent.config.schema import ModelConfig
    from agent.pipeline.infer import InferenceStage
    from models.windows_io import window_from_dict

    sample_path = Path(samples) if samples else SAMPLES_DIR / f"{name}.json"
    try:
        doc = json.loads(sample_path.read_text(encoding="utf-8"))
        windows = [window_from_dict(w) for w in doc["windows"]]
        stream = str(doc["stream"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"ok": False, "usage": True, "name": name,
                "error": f"cannot read samples {sample_path}: {exc}"}
    # The model itself, not what the skill guard would publish at a site.
    stage = InferenceStage([ModelConfig(name=name, stream=stream, path=path, guard=False)])
    try:
        if stage.load_errors:
            return {"ok": False, "name": name, "error": f"REFUSED: {stage.load_errors[0]}"}
        t0 = time.perf_counter()
        results = asyncio.run(_replay(stage, windows))
        wall_s = time.perf_counter() - t0
        version = stage.versions().get(name)
        runtime = stage.status()["models"].get(name, {}).get("runtime")
    finally:
        stage.close()
    expected = doc.get("expected", [])
    same_model = not path or version == doc.get("version")
    lat = np.array([r["latency_ms"] for r in results])
    out: dict[str, Any] = {
        "name": name, "version": version, "runtime": runtime, "windows": len(windows),
        "inferences": len(results), "wall_s": wall_s, "last": results[-3:],
        "latency_ms": ({"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
                       if len(lat) else None),
        "compared": same_model, "ok": True, "error": None}
    if not same_model:
        out["summary"] = "a different model than the samples were made with: not compared"
    elif len(expected) != len(results):
        out.update(ok=False, error=f"{len(results)} inferences, the samples expect "
                                   f"{len(expected)}")
    else:
        mismatches = sum(not _close(got["outputs"][k], want.get(k))
                         for got, want in zip(results, expected, strict=True) for k in want)
        if mismatches:
            out.update(ok=False, error=f"{mismatches} outputs differ from the expected values")
        else:
            out["summary"] = f"{len(results)} outputs match the expected values"
    return out


def _outputs_text(outputs: dict[str, Any]) -> str:
    return "  ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}"
                     for k, v in outputs.items())


def cmd_test(args: argparse.Namespace) -> int:
    r = run_samples(args.name, args.path, args.samples)
    if args.json:
        print(jsontext.dumps(r, indent=2))
        return 2 if r.get("usage") else 0 if r["ok"] else 1
    if "windows" not in r:
        print(r["error"] if r["error"].startswith("REFUSED") else f"error: {r['error']}")
        return 2 if r.get("usage") else 1
    print(f"{args.name} version {r['version']} ({r['runtime']}): {r['windows']} "
          f"sample windows -> {r['inferences']} inferences in {r['wall_s']:.2f} s")
    for x in r["last"]:
        print(f"  window {x['start']}: {_outputs_text(x['outputs'])}")
    if r["latency_ms"]:
        print(f"  latency per run: p50 {r['latency_ms']['p50']:.3f} ms, "
              f"p99 {r['latency_ms']['p99']:.3f} ms")
    if not r["compared"]:
        print(f"  ({r['summary']})")
        return 0
    if not r["ok"]:
        print(f"  FAIL: {r['error']}")
        return 1
    print(f"  {r['summary']}")
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
