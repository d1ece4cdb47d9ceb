"""Calibrating the shipped models to another site: same graph in the site's units, own version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.calibrate import SiteScale, calibrate, main, site_scale, trained_scale, training_scale
from models.csvdata import SiteDataError
from models.dataset import build
from models.evaluate import manifest_spec
from models.manifest import load_manifest, session_options, shipped_paths, verify
from models.simulate import simulate_site
from models.sites import preset

pytest.importorskip("onnx")

SITE = SiteScale("America/Chicago", 16.0, 6000.0)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])


def test_calibrated_traffic_is_the_trained_graph_in_site_units(tmp_path: Path) -> None:
    shipped = load_manifest(shipped_paths("traffic")[1])
    m = calibrate("traffic", SITE, tmp_path)
    vm = verify(tmp_path / "traffic.onnx")
    assert m.version != shipped.version and vm.version == m.version
    assert m.timezone == "America/Chicago" and m.metrics == {}
    assert m.congestion is not None and m.congestion.free_flow_speed_m_s == 16.0
    trained = trained_scale(shipped)
    speed, flow = trained.free_flow_m_s / 16.0, trained.flow_p99_veh_h / 6000.0
    scale = np.array([speed if n.startswith("speed_") else flow if n.startswith("flow_")
                      else 1.0 for n in m.input_names], dtype=np.float32)
    for new, old, s in zip(m.inputs, shipped.inputs, scale, strict=True):
        assert new.fill == pytest.approx(old.fill / s, rel=1e-5)
    rng = np.random.default_rng(1)
    fills = np.array([i.fill for i in m.inputs], dtype=np.float32)
    x = (fills * rng.uniform(0.5, 1.5, (256, len(fills)))).astype(np.float32)
    got_speed, got_level = vm.session.run(None, {"features": x})
    want_speed, want_level = _session(shipped_paths("traffic")[0]).run(
        None, {"features": (x * scale).astype(np.float32)})
    assert np.allclose(got_speed, want_speed / speed, rtol=1e-5)
    assert np.array_equal(got_level, want_level)
    # Levels follow the site's free-flow speed (thresholds are fractions of it).
    assert (got_level[got_speed < 0.45 * 16.0] == 2).all()
    assert (got_level[got_speed > 0.85 * 16.0] == 0).all()


def test_calibrated_energy_only_moves_the_time_zone(tmp_path: Path) -> None:
    m = calibrate("energy", SITE, tmp_path)
    shipped = load_manifest(shipped_paths("energy")[1])
    assert m.version != shipped.version and m.timezone == "America/Chicago"
    assert [i.fill for i in m.inputs] == [i.fill for i in shipped.inputs]
    x = np.array([[i.fill for i in m.inputs]] * 4, dtype=np.float32)
    got = _session(tmp_path / "energy.onnx").run(None, {"features": x})[0]
    want = _session(shipped_paths("energy")[0]).run(None, {"features": x})[0]
    assert np.array_equal(got, want)
    assert json.loads(json.dumps(m.training["calibration"]))["calibrated_from"] == shipped.version


def test_model_without_training_scale_is_refused(tmp_path: Path) -> None:
    onnx_path, man_path = shipped_paths("traffic")
    shutil.copy(onnx_path, tmp_path / "traffic.onnx")
    doc = json.loads(man_path.read_text())
    del doc["training"]["site_scale"]
    (tmp_path / "traffic.json").write_text(json.dumps(doc))
    with pytest.raises(SiteDataError, match=r"records no training\.site_scale"):
        calibrate("traffic", SITE, tmp_path / "out", source=tmp_path / "traffic.onnx")


def test_site_scale_needs_traffic() -> None:
    data = simulate_site(preset("chicago-arterial", days=14, start="2025-06-02"))
    s = site_scale(data)
    assert s.timezone == "America/Chicago" and 15.0 < s.free_flow_m_s < 17.5
    assert s.flow_p99_veh_h > 3000
    data.columns["occupancy"][:] = np.nan
    with pytest.raises(SiteDataError, match="too few windows"):
        site_scale(data)


def test_calibrated_traffic_beats_persistence_on_the_arterial(tmp_path: Path) -> None:
    data = simulate_site(preset("chicago-arterial"))
    assert main(["--preset", "chicago-arterial", "--models", "traffic", "--out",
                 str(tmp_path)]) == 0
    m = load_manifest(tmp_path / "traffic.json")
    assert m.training["calibration"]["site"]["free_flow_m_s"] == training_scale(data).free_flow_m_s
    md = build("traffic", data, spec=manifest_spec(m))
    te = md.split == 2
    pred = _session(tmp_path / "traffic.onnx").run(["speed_next"], {"features": md.x})[0][:, 0]
    mae = float(np.abs(pred[te] - md.y[te]).mean())
    assert mae < 0.85 * float(np.abs(md.persistence[te] - md.y[te]).mean())
    shipped = _session(shipped_paths("traffic")[0]).run(
        ["speed_next"], {"features": build("traffic", data, spec=manifest_spec(
            load_manifest(shipped_paths("traffic")[1]))).x})[0][:, 0]
    assert mae < 0.5 * float(np.abs(shipped[te] - md.y[te]).mean())
