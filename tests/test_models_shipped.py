"""The shipped ONNX files, run by onnxruntime on the training site's held-out test weeks, meet
their targets and score what their manifests say (no torch needed)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models.dataset import ModelData, build
from models.manifest import load_manifest, session_options, shipped_paths
from models.simulate import simulate_site
from models.train import free_flow_speed, slow_rows

ENERGY_MAE_MAX_W = 163.0  # an off-the-shelf gradient-boosting model on the same 14 inputs
TRAFFIC_MAE_MAX_M_S = 0.48
TRAFFIC_SKILL_MIN = 0.25  # overall, against persistence
SLOW_SKILL_MIN = 0.15  # windows whose next window is slowing or congested


@pytest.fixture(scope="module")
def site():  # type: ignore[no-untyped-def]
    return simulate_site()


def _run(name: str, site) -> tuple[ModelData, np.ndarray]:  # type: ignore[no-untyped-def]
    md = build(name, site)
    m = load_manifest(shipped_paths(name)[1])
    assert md.spec.names == tuple(m.input_names)
    sess = ort.InferenceSession(str(shipped_paths(name)[0]), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    return md, sess.run([m.outputs[0].name], {m.input_tensor: md.x})[0][:, 0]


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def test_energy_meets_its_target(site) -> None:  # type: ignore[no-untyped-def]
    md, pred = _run("energy", site)
    te = md.split == 2
    mae = _mae(pred[te], md.y[te])
    assert mae <= ENERGY_MAE_MAX_W
    assert mae < 0.7 * _mae(md.persistence[te], md.y[te])
    metrics = load_manifest(shipped_paths("energy")[1]).metrics
    assert metrics["model"]["mae"] == pytest.approx(mae, abs=0.01)


def test_traffic_meets_its_targets_overall_and_in_slow_windows(site) -> None:  # type: ignore[no-untyped-def]
    md, pred = _run("traffic", site)
    m = load_manifest(shipped_paths("traffic")[1])
    te = md.split == 2
    mae, base = _mae(pred[te], md.y[te]), _mae(md.persistence[te], md.y[te])
    assert mae <= TRAFFIC_MAE_MAX_M_S and 1 - mae / base >= TRAFFIC_SKILL_MIN
    free_flow = free_flow_speed(md)
    assert m.congestion is not None and m.congestion.free_flow_speed_m_s == free_flow
    slow = te & slow_rows(md, free_flow)
    assert 0.05 < slow.sum() / te.sum() < 0.2
    skill = 1 - _mae(pred[slow], md.y[slow]) / _mae(md.persistence[slow], md.y[slow])
    assert skill >= SLOW_SKILL_MIN
    recorded = m.metrics["slowing_or_congested_next"]
    assert recorded["rows"] == int(slow.sum())
    assert recorded["skill"] == pytest.approx(skill, abs=1e-3)
    assert m.metrics["model"]["mae"] == pytest.approx(mae, abs=1e-3)


def test_manifests_describe_the_recipe() -> None:
    for name in ("traffic", "energy"):
        m = load_manifest(shipped_paths(name)[1])
        cfg = m.training["config"]
        assert {"epochs", "hidden", "depth", "seed"} <= set(cfg)
        assert m.training["loss"].startswith("huber(")
        assert m.training["source"].startswith("simulated site (berlin-street")
