"""A model's version (its sha256) depends on what was trained, not on where the tree was."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models import SHIPPED
from models.manifest import read_model_header, shipped_paths

ROOT = Path(__file__).resolve().parent.parent
# What the exporter writes by default and a provenance-free graph must not carry.
PROVENANCE = (b"pkg.torch", b"stack_trace", b"File \"", b".py\"", b"fx_node", b"class_hierarchy")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_graphs_carry_no_provenance(name: str) -> None:
    data = shipped_paths(name)[0].read_bytes()
    for marker in PROVENANCE:
        assert marker not in data, marker
    assert str(ROOT).encode() not in data
    _, meta = read_model_header(data)
    assert set(meta) == {"edge_agent.inputs", "edge_agent.outputs"}


def test_strip_provenance_removes_node_metadata() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from models.export import strip_provenance

    node = helper.make_node("Relu", ["x"], ["y"], doc_string="File \"/src/nets.py\", line 1")
    helper.set_metadata_props(node, {"pkg.torch.onnx.stack_trace": "/src/nets.py"})
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    helper.set_metadata_props(graph, {"pkg.torch.export.graph_signature": "s97"})
    model = helper.make_model(graph)
    helper.set_metadata_props(model, {"anything": "else"})
    strip_provenance(model)
    data = model.SerializeToString()
    assert b"/src" not in data and b"s97" not in data and b"anything" not in data
    assert model.graph.node[0].op_type == "Relu"


_EXPORT = """
import sys
from pathlib import Path
import models
assert Path(models.__file__).resolve().is_relative_to(Path.cwd().resolve()), models.__file__
from models.simulate import SiteParams, simulate_site
from models.train import TrainConfig, train_all
cfg = TrainConfig(epochs=1, hidden=16, depth=1)
train_all(simulate_site(SiteParams(days=42)), Path(sys.argv[1]), cfg, ["traffic", "energy"],
          source="copy")
"""


def _tree_copy(dst: Path) -> Path:
    for part in ("agent", "models"):
        shutil.copytree(ROOT / part, dst / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "samples"))
    return dst


@pytest.mark.torch
def test_two_checkouts_export_the_same_bytes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    digests = []
    for where in ("a/checkout", "elsewhere/deeper/clone"):
        tree = _tree_copy(tmp_path / where)
        out = tmp_path / f"out-{len(digests)}"
        subprocess.run([sys.executable, "-c", _EXPORT, str(out)], cwd=tree, check=True,
                       env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                       capture_output=True)
        files = {n: (out / f"{n}.onnx").read_bytes() for n in SHIPPED}
        for data in files.values():
            assert str(tree).encode() not in data and b"stack_trace" not in data
        digests.append({n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    assert digests[0] == digests[1]
