"""Retraining reproduces the shipped models (needs the train extra; skipped without torch).

The run uses the shipped configuration (simulated year, seed 7, 30 epochs, one thread), so on
the same platform it reproduces the shipped metrics exactly; the 2 % tolerance absorbs
floating-point differences between CPU kernels on other machines. It takes ~20 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from models import SHIPPED  # noqa: E402
from models.manifest import load_manifest, shipped_paths, verify  # noqa: E402
from models.simulate import SiteParams, simulate_site  # noqa: E402
from models.train import TrainConfig, train_all  # noqa: E402

TOLERANCE = 0.02

pytestmark = pytest.mark.torch


def test_training_reproduces_the_shipped_metrics(tmp_path: Path) -> None:
    shipped = {n: load_manifest(shipped_paths(n)[1]) for n in SHIPPED}
    cfg = TrainConfig(**shipped["traffic"].training["config"])
    results = train_all(simulate_site(SiteParams(seed=cfg.seed)), tmp_path, cfg, list(SHIPPED),
                        source="test")
    for name in SHIPPED:
        vm = verify(tmp_path / f"{name}.onnx")
        assert vm.manifest.input_names == shipped[name].input_names
        want = shipped[name].metrics
        got = results[name]
        for method in ("model", "persistence", "seasonal_naive", "original_mlp"):
            for metric in ("mae", "rmse"):
                assert got[method][metric] == pytest.approx(want[method][metric], rel=TOLERANCE), \
                    (name, method, metric)
        for base in ("persistence", "original_mlp"):
            assert got["model"]["mae"] < got[base]["mae"]
            assert got["model"]["rmse"] < got[base]["rmse"]
