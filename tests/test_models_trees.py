"""The tree half of a short-history traffic model: scikit-learn's trees as leaf tables, and the
exported blend of net and trees, identical in torch, onnxruntime and the numpy executor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.dataset import build
from models.simulate import simulate_site
from models.sites import preset
from models.train import short_history

pytest.importorskip("sklearn")

from sklearn.ensemble import GradientBoostingRegressor

from models.trees import DEPTH, LEARNING_RATE, TREES, fit_trees


def _reference(x: np.ndarray, t: np.ndarray) -> GradientBoostingRegressor:
    return GradientBoostingRegressor(loss="absolute_error", n_estimators=TREES, max_depth=DEPTH,
                                     learning_rate=LEARNING_RATE, random_state=0).fit(
        x.astype(np.float32), t.astype(np.float64))


def test_leaf_tables_predict_what_the_fitted_trees_predict_even_on_the_thresholds() -> None:
    rng = np.random.default_rng(5)
    # Coarse values, so many inputs sit exactly on a split threshold or one float32 step off.
    x = np.round(rng.normal(size=(600, 4)) * 4) / 4
    t = np.where(x[:, 0] > 0.25, 3.0, -1.0) + x[:, 1] * x[:, 2] + rng.normal(0, 0.1, 600)
    tables = fit_trees(x, t)
    ref = _reference(x, t)
    probe = np.concatenate([x, np.nextafter(x.astype(np.float32), np.float32(np.inf)),
                            np.nextafter(x.astype(np.float32), np.float32(-np.inf)),
                            rng.normal(size=(200, 4)) * 10]).astype(np.float32)
    got, want = tables.predict(probe), ref.predict(probe)
    assert np.abs(got - want).max() < 1e-4
    assert tables.index.shape == (DEPTH, tables.value.size)
    assert np.abs(want).max() > 1.0  # the trees learned the step, not a constant


def test_a_fortnight_is_a_short_history_and_a_quarter_is_not() -> None:
    long = simulate_site(preset("seville-suburb", days=75, seed=3))
    assert short_history(build("traffic", long.slice(0, 14 * 288)))
    assert not short_history(build("traffic", long))


@pytest.mark.torch
def test_a_short_history_exports_the_mean_of_net_and_trees_for_both_runtimes(
        tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from models.export import export_trained
    from models.manifest import session_options
    from models.numpy_exec import NumpySession
    from models.train import TrainConfig, _predict, train_traffic

    data = simulate_site(preset("chicago-arterial", days=14, seed=4))
    trained = train_traffic(data, TrainConfig(epochs=2, min_steps=30, hidden=16, depth=1))
    assert trained.training["trees"]["leaves"] > TREES
    manifest = export_trained(trained, tmp_path)
    assert manifest.training["trees"] == trained.training["trees"]
    md = trained.data
    blend = trained.graph.net
    anchor = md.spec.names.index("speed_mean")
    tables = fit_trees(md.x[md.split == 0], (md.y - md.x[:, anchor])[md.split == 0])
    tree = np.maximum(md.x[:, anchor] + tables.predict(md.x), 0.0)
    want = 0.5 * _predict(blend.net, md.x) + 0.5 * tree
    # The two halves disagree: the blend is not one of them under another name.
    assert np.abs(_predict(blend.net, md.x) - tree).mean() > 0.01

    path = str(tmp_path / "traffic.onnx")
    sess = ort.InferenceSession(path, sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    feeds = {manifest.input_tensor: md.x}
    speed_ort = sess.run(["speed_next"], feeds)[0][:, 0]
    speed_np, level_np = NumpySession.from_path(path).run(
        ["speed_next", "congestion_level"], feeds)
    assert np.abs(speed_ort - want).max() < 1e-3
    assert np.abs(speed_np[:, 0] - want).max() < 1e-3
    # The congestion level follows the blended speed, not the net's alone (a window within
    # float rounding of a threshold may fall either side).
    assert manifest.congestion is not None
    free = manifest.congestion.free_flow_speed_m_s
    level = (want < 0.8 * free).astype(np.float32) + (want < 0.5 * free)
    assert level.max() > 0
    assert np.mean(level_np[:, 0] != level) < 1e-3
    with torch.no_grad():
        assert np.abs(trained.graph(torch.from_numpy(md.x))[0].numpy()[:, 0] - want).max() < 1e-3
