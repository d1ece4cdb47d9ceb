"""The numpy executor against onnxruntime on every graph the gateway runs, and the agent with
onnxruntime hidden (what a 32-bit Raspberry Pi OS gateway has)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from models import SHIPPED
from models.calibrate import SiteScale, calibrate
from models.manifest import (
    ModelError,
    session_options,
    sha256_bytes,
    shipped_paths,
    verify,
)
from models.numpy_exec import GraphError, NumpySession
from tests.test_shadow import offset_model

TOLERANCE = 1e-5
BLOCKER = """\
import sys


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None


sys.meta_path.insert(0, _Hide())
"""


def rows(onnx_path: Path, n: int = 512) -> np.ndarray:
    """Inputs around the fill values (realistic rows) and far from them (wild ones)."""
    inputs = json.loads(onnx_path.with_suffix(".json").read_text())["inputs"]
    fills = np.array([i["fill"] for i in inputs], dtype=np.float64)
    rng = np.random.default_rng(7)
    near = fills * rng.uniform(0.3, 1.7, (n, len(fills)))
    wild = rng.normal(0.0, 1.0, (n, len(fills))) * (np.abs(fills) + 1.0) * 3.0
    return np.vstack([near, wild, fills[None]]).astype(np.float32)


def assert_matches_onnxruntime(onnx_path: Path) -> None:
    data = onnx_path.read_bytes()
    ref = ort.InferenceSession(data, sess_options=session_options(),
                               providers=["CPUExecutionProvider"])
    ours = NumpySession(data)
    assert [(i.name, i.shape, i.type) for i in ours.get_inputs()] == \
        [(i.name, i.shape, i.type) for i in ref.get_inputs()]
    assert [o.name for o in ours.get_outputs()] == [o.name for o in ref.get_outputs()]
    x = rows(onnx_path)
    names = [o.name for o in ref.get_outputs()]
    for _ in ("interpreted", "planned"):  # the second run of a shape goes through its plan
        for got, want in zip(ours.run(names, {"features": x}), ref.run(names, {"features": x}),
                             strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            # Relative to each value, with an absolute floor of 1e-5 of the output's spread.
            floor = TOLERANCE * max(1.0, float(np.max(np.abs(want))))
            np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=floor)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_matches_onnxruntime(name: str) -> None:
    assert_matches_onnxruntime(shipped_paths(name)[0])


@pytest.mark.parametrize("name", SHIPPED)
def test_a_calibrated_model_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    calibrate(name, SiteScale("America/Chicago", 16.0, 6000.0), tmp_path)
    assert_matches_onnxruntime(tmp_path / f"{name}.onnx")


@pytest.mark.parametrize("name", SHIPPED)
def test_a_retrained_model_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    """Retraining keeps the exported graph and changes its weights: new weights here."""
    onnx_path, man_path = shipped_paths(name)
    model = onnx.load(str(onnx_path))
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 2 and min(w.shape) > 1:
            init.CopyFrom(numpy_helper.from_array(
                (w * rng.uniform(0.5, 1.5, w.shape)).astype(np.float32), init.name))
    dst = tmp_path / f"{name}.onnx"
    dst.write_bytes(model.SerializeToString())
    dst.with_suffix(".json").write_bytes(man_path.read_bytes())
    assert_matches_onnxruntime(dst)


def test_a_gather_graph_matches_onnxruntime(tmp_path: Path) -> None:
    assert_matches_onnxruntime(offset_model(tmp_path, 35.0, "gather"))


def test_every_operator_against_onnxruntime(tmp_path: Path) -> None:
    """The operators no shipped graph uses yet, with unpacked attributes and data fields."""
    f = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["rev"]),
        helper.make_node("Relu", ["rev"], ["r"]),
        helper.make_node("Tanh", ["r"], ["t"]),
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], alpha=0.5, beta=2.0, transB=1),
        helper.make_node("Clip", ["g", "", "hi"], ["c"]),
        helper.make_node("Greater", ["c", "zero"], ["gt"]),
        helper.make_node("Cast", ["gt"], ["gtf"], to=f),
        helper.make_node("Neg", ["t"], ["n"]),
        helper.make_node("Abs", ["n"], ["ab"]),
        helper.make_node("Identity", ["ab"], ["out"]),
        helper.make_node("Div", ["c", "two"], ["half"]),
    ]
    graph = helper.make_graph(
        nodes, "ops", [helper.make_tensor_value_info("features", f, ["batch", 4])],
        [helper.make_tensor_value_info(n, f, ["batch", k])
         for n, k in (("out", 4), ("gtf", 3), ("half", 3))],
        [helper.make_tensor("s", onnx.TensorProto.INT64, [1], [-1]),
         helper.make_tensor("e", onnx.TensorProto.INT64, [1], [-100]),
         helper.make_tensor("a", onnx.TensorProto.INT64, [1], [1]),
         helper.make_tensor("st", onnx.TensorProto.INT64, [1], [-1]),
         helper.make_tensor("w", f, [3, 4], list(np.linspace(-1, 1, 12))),
         helper.make_tensor("b", f, [3], [0.1, -0.2, 0.3]),
         helper.make_tensor("hi", f, [], [0.7]),
         helper.make_tensor("zero", f, [], [0.0]),
         helper.make_tensor("two", f, [], [2.0])],
    )
    graph.node.insert(0, helper.make_node("Identity", ["features"], ["x"]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    path = tmp_path / "ops.onnx"
    path.write_bytes(model.SerializeToString())
    data = path.read_bytes()
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).normal(0, 2, (64, 4)).astype(np.float32)
    ours = NumpySession(data)
    for _ in ("interpreted", "planned"):
        for got, want in zip(ours.run(None, {"features": x}), ref.run(None, {"features": x}),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)


def test_an_unknown_operator_is_refused_at_open_naming_it(tmp_path: Path) -> None:
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Softmax", ["features"], ["y"], name="soft")],
                              "g", [helper.make_tensor_value_info("features", f, ["batch", 2])],
                              [helper.make_tensor_value_info("y", f, ["batch", 2])])
    data = helper.make_model(graph).SerializeToString()
    with pytest.raises(GraphError, match="node 'soft': operator Softmax is not supported"):
        NumpySession(data)


@pytest.mark.parametrize("cut", [1, 7, 100, 5000, -3])
def test_a_truncated_file_is_a_graph_error(cut: int) -> None:
    data = shipped_paths("traffic")[0].read_bytes()
    with pytest.raises(GraphError):
        NumpySession(data[:cut])


def test_verify_with_the_numpy_runtime_and_a_bad_runtime(tmp_path: Path) -> None:
    vm = verify(shipped_paths("energy")[0], runtime="numpy")
    assert vm.runtime == "numpy" and isinstance(vm.session, NumpySession)
    assert verify(shipped_paths("energy")[0]).runtime == "numpy"  # auto: the executor runs it
    assert verify(shipped_paths("energy")[0], runtime="onnxruntime").runtime == "onnxruntime"
    with pytest.raises(ModelError, match="unknown runtime 'tpu'"):
        verify(shipped_paths("energy")[0], runtime="tpu")  # type: ignore[arg-type]


def test_a_numpy_model_refused_by_the_executor_names_the_file(tmp_path: Path) -> None:
    onnx_path, man_path = shipped_paths("energy")
    model = onnx.load(str(onnx_path))
    model.graph.node[-1].op_type = "Softsign"
    del model.graph.node[-1].input[1:]  # Softsign takes one input (Clip took three)
    dst = tmp_path / "energy.onnx"
    dst.write_bytes(model.SerializeToString())
    doc = json.loads(man_path.read_text())
    digest = sha256_bytes(dst.read_bytes())
    doc.update(sha256=digest, version=digest[:12], file=dst.name)
    dst.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"energy\.onnx: the numpy executor cannot run it.*"
                                         r"Softsign"):
        verify(dst, runtime="numpy")
    # auto: a graph the executor does not run goes to onnxruntime
    assert verify(dst, runtime="auto").runtime == "onnxruntime"


def _hidden_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path.cwd())])
    return env


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *argv], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_blocker_hides_onnxruntime(tmp_path: Path) -> None:
    env = _hidden_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "hidden by the test" in proc.stderr


@pytest.mark.parametrize("name", SHIPPED)
def test_model_test_runs_without_onnxruntime(name: str, tmp_path: Path) -> None:
    proc = _cli(_hidden_env(tmp_path), "model", "test", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(numpy)" in proc.stdout and "outputs match the expected values" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_the_agent_runs_its_models_without_onnxruntime(tmp_path: Path) -> None:
    """The inference stage on the shipped samples, onnxruntime absent: the same outputs."""
    script = """\
import asyncio, json, sys
import agent.runtime  # the agent with zero models never imports onnxruntime
assert "onnxruntime" not in sys.modules
from agent.config.schema import ModelConfig
from agent.pipeline.infer import InferenceStage
from models import SAMPLES_DIR
from models.windows_io import window_from_dict

async def main():
    out = {}
    for name in ("traffic", "energy"):
        doc = json.loads((SAMPLES_DIR / f"{name}.json").read_text())
        stage = InferenceStage([ModelConfig(name=name, stream=doc["stream"], guard=False)])
        assert not stage.load_errors, stage.load_errors
        got = []
        for w in doc["windows"]:
            got += [i.outputs for i in await stage.on_window(window_from_dict(w))]
        out[name] = {"got": got, "want": doc["expected"],
                     "runtime": stage.status()["models"][name]["runtime"]}
        stage.close()
    print(json.dumps(out))

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_hidden_env(tmp_path),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for name in SHIPPED:
        r = result[name]
        assert r["runtime"] == "numpy" and len(r["got"]) == len(r["want"]) > 0
        for got, want in zip(r["got"], r["want"], strict=True):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, key)


def test_help_keeps_the_model_commands_without_onnxruntime(tmp_path: Path) -> None:
    env = _hidden_env(tmp_path)
    proc = _cli(env, "--help")
    assert proc.returncode == 0 and "model" in proc.stdout.split("positional arguments")[1]
    proc = _cli(env, "model", "verify", str(shipped_paths("traffic")[0]))
    assert proc.returncode == 0 and "runs in numpy" in proc.stdout


def test_a_configured_onnxruntime_that_is_missing_is_said_clearly(tmp_path: Path) -> None:
    script = """\
from agent.config.schema import ModelConfig
from agent.pipeline.infer import InferenceStage
stage = InferenceStage([ModelConfig(name="energy", stream="cabinet", runtime="onnxruntime")])
print(stage.load_errors[0])
stage.close()
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_hidden_env(tmp_path),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "runtime 'onnxruntime' is configured but cannot be imported" in proc.stdout
    assert 'set runtime = "numpy"' in proc.stdout
