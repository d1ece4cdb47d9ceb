"""`edge-agent model ...` handlers, called through a parser as the CLI mounts them."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from models.cli import register
from models.manifest import shipped_paths


def run(*argv: str) -> int:
    ap = argparse.ArgumentParser(prog="edge-agent")
    register(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(list(argv))
    return int(args.func(args))


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("model", "list") == 0
    out = capsys.readouterr().out
    for name in ("traffic", "energy"):
        version = json.loads(shipped_paths(name)[1].read_text())["version"]
        assert f"{name:8s} PASS  {version}  opset 20" in out
    assert run("model", "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["ok"], r["verified"]) for r in rows] == [
        ("traffic", True, True), ("energy", True, True)]
    assert all(r["samples"].endswith("outputs match the expected values") for r in rows)


def test_list_fails_a_model_whose_samples_do_not_match(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import models.cli

    samples = tmp_path / "samples"
    shutil.copytree(Path(shipped_paths("traffic")[0]).parent / "samples", samples)
    doc = json.loads((samples / "energy.json").read_text())
    doc["expected"][0]["power_next_w"] += 100.0
    (samples / "energy.json").write_text(json.dumps(doc))
    monkeypatch.setattr(models.cli, "SAMPLES_DIR", samples)
    assert run("model", "list") == 1
    out = capsys.readouterr().out
    assert "traffic  PASS" in out and "energy   FAIL" in out
    assert "1 outputs differ from the expected values" in out


@pytest.mark.parametrize("name", ["traffic", "energy"])
def test_test_runs_the_samples(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("model", "test", name) == 0
    out = capsys.readouterr().out
    assert "outputs match the expected values" in out
    assert "latency per run: p50" in out


def test_test_fails_when_outputs_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads((Path(shipped_paths("traffic")[0]).parent / "samples" / "traffic.json")
                     .read_text())
    doc["expected"][3]["speed_next"] += 1.0
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    assert run("model", "test", "traffic", "--samples", str(path)) == 1
    assert "FAIL: 1 outputs differ" in capsys.readouterr().out


def test_verify_ok_and_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("model", "verify", str(shipped_paths("energy")[0])) == 0
    assert "ok: energy version" in capsys.readouterr().out
    dst = tmp_path / "energy.onnx"
    shutil.copy(shipped_paths("energy")[0], dst)
    shutil.copy(shipped_paths("traffic")[1], dst.with_suffix(".json"))  # someone else's manifest
    assert run("model", "verify", str(dst)) == 1
    out = capsys.readouterr().out
    assert "REFUSED:" in out and "does not match the manifest" in out


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="the train extra is installed")
def test_train_without_torch_says_what_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("model", "train", "--out", "unused") == 1
    out = capsys.readouterr().out
    assert "train extra" in out and "torch==2.13.0" in out
