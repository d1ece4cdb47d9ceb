"""The shipped ONNX models against their manifests, and the refusals of bad model files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from models import SHIPPED
from models.manifest import (
    META_INPUTS,
    ModelError,
    load_manifest,
    read_model_header,
    sha256_bytes,
    shipped_paths,
    verify,
)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_matches_manifest(name: str) -> None:
    onnx_path, man_path = shipped_paths(name)
    vm = verify(onnx_path, man_path)
    m = vm.manifest
    assert m.name == name
    assert m.sha256 == sha256_bytes(onnx_path.read_bytes())
    assert m.version == m.sha256[:12]
    assert onnx_path.stat().st_size < 1_000_000
    assert vm.session.get_inputs()[0].shape[1] == len(m.inputs)
    assert {"hour_sin", "hour_cos", "dow_sin", "dow_cos"} <= set(m.input_names)
    assert all(i.unit for i in m.inputs) and all(o.unit for o in m.outputs)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_metrics_beat_persistence_and_original(name: str) -> None:
    metrics = load_manifest(shipped_paths(name)[1]).metrics
    for base in ("persistence", "original_mlp", "seasonal_naive"):
        assert metrics["model"]["mae"] < metrics[base]["mae"], base
        assert metrics["model"]["rmse"] < metrics[base]["rmse"], base
    assert metrics["rows"] > 10_000


def test_header_reader_agrees_with_onnx() -> None:
    for name in SHIPPED:
        path = shipped_paths(name)[0]
        model = onnx.load(str(path))
        opsets, meta = read_model_header(path.read_bytes())
        assert opsets == {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        assert meta == {p.key: p.value for p in model.metadata_props}


def _copy(tmp_path: Path, name: str = "traffic") -> tuple[Path, Path]:
    onnx_path, man_path = shipped_paths(name)
    dst = tmp_path / f"{name}.onnx"
    shutil.copy(onnx_path, dst)
    shutil.copy(man_path, dst.with_suffix(".json"))
    return dst, dst.with_suffix(".json")


def _rewrite_manifest(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _restamp(onnx_path: Path, man_path: Path) -> None:
    digest = sha256_bytes(onnx_path.read_bytes())
    _rewrite_manifest(man_path, sha256=digest, version=digest[:12])


def test_corrupt_file_is_refused_by_hash(tmp_path: Path) -> None:
    onnx_path, _ = _copy(tmp_path)
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"sha256 .* does not match the manifest"):
        verify(onnx_path)


def test_truncated_file_with_matching_hash_is_refused(tmp_path: Path) -> None:
    onnx_path, man_path = _copy(tmp_path)
    onnx_path.write_bytes(onnx_path.read_bytes()[:5000])
    _restamp(onnx_path, man_path)
    with pytest.raises(ModelError, match="not an ONNX model"):
        verify(onnx_path)


def test_wrong_input_names_are_refused(tmp_path: Path) -> None:
    onnx_path, man_path = _copy(tmp_path)
    doc = json.loads(man_path.read_text())
    doc["inputs"][0]["name"] = "vehicles"
    man_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"input names differ .*0: graph 'flow_veh_h' vs "
                                          r"manifest 'vehicles'"):
        verify(onnx_path)


def test_missing_input_is_refused(tmp_path: Path) -> None:
    onnx_path, man_path = _copy(tmp_path)
    doc = json.loads(man_path.read_text())
    doc["inputs"].pop()
    man_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"18 in graph, 17 in manifest"):
        verify(onnx_path)


def test_opset_disagreeing_with_manifest_is_refused(tmp_path: Path) -> None:
    onnx_path, man_path = _copy(tmp_path)
    _rewrite_manifest(man_path, opset=18)
    with pytest.raises(ModelError, match="graph opset 20 but the manifest says 18"):
        verify(onnx_path)


def test_unsupported_opset_is_refused(tmp_path: Path) -> None:
    onnx_path, man_path = _copy(tmp_path)
    model = onnx.load(str(onnx_path))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 26
    onnx_path.write_bytes(model.SerializeToString())
    _restamp(onnx_path, man_path)
    _rewrite_manifest(man_path, opset=26)
    with pytest.raises(ModelError, match=r"opset 26 is outside what this gateway runs"):
        verify(onnx_path)


def test_graph_without_names_is_refused(tmp_path: Path) -> None:
    onnx_path, man_path = _copy(tmp_path)
    model = onnx.load(str(onnx_path))
    kept = [p for p in model.metadata_props if p.key != META_INPUTS]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx_path.write_bytes(model.SerializeToString())
    _restamp(onnx_path, man_path)
    with pytest.raises(ModelError, match=r"graph carries no 'edge_agent\.inputs' metadata"):
        verify(onnx_path)


def test_bad_manifest_names_the_field(tmp_path: Path) -> None:
    onnx_path, man_path = _copy(tmp_path)
    _rewrite_manifest(man_path, window_s=-5)
    with pytest.raises(ModelError, match="manifest field window_s"):
        verify(onnx_path)
    man_path.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        verify(onnx_path)
    with pytest.raises(ModelError, match="cannot read model"):
        verify(tmp_path / "absent.onnx", shipped_paths("traffic")[1])


def test_runtime_modules_import_without_torch() -> None:
    code = ("import sys; import agent.pipeline.infer, models.cli, models.manifest, models.train, "
            "models.export; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False,
                          cwd=Path(__file__).resolve().parent.parent).returncode == 0
