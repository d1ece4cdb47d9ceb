"""The inference stage with real onnxruntime sessions on the shipped models."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import onnx
import pytest

from agent.config.schema import ModelConfig
from agent.pipeline.infer import InferenceStage
from agent.readings import ChannelStats, Window
from models import SAMPLES_DIR
from models.manifest import sha256_bytes, shipped_paths
from models.windows_io import split_window, window_from_dict

NS = 1_000_000_000
T0 = 1_740_985_200  # 2025-03-03 07:00 UTC, on a 300 s boundary


def samples(name: str) -> tuple[list[Window], list[dict[str, float]], str]:
    doc = json.loads((SAMPLES_DIR / f"{name}.json").read_text())
    return [window_from_dict(w) for w in doc["windows"]], doc["expected"], doc["version"]


def variant(tmp_path: Path, name: str, tag: str) -> Path:
    """A valid copy of a shipped model with a different sha256 (an extra metadata entry)."""
    onnx_path, man_path = shipped_paths(name)
    model = onnx.load(str(onnx_path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "variant", tag
    dst = tmp_path / f"{name}-{tag}.onnx"
    dst.write_bytes(model.SerializeToString())
    doc = json.loads(man_path.read_text())
    digest = sha256_bytes(dst.read_bytes())
    doc.update(sha256=digest, version=digest[:12], file=dst.name)
    dst.with_suffix(".json").write_text(json.dumps(doc))
    return dst


@pytest.fixture(params=["auto", "onnxruntime"])
def stage(request: pytest.FixtureRequest) -> InferenceStage:
    """Both shipped models with the skill guard off: what the model itself says, in each runtime
    (``auto`` is the numpy executor for these graphs)."""
    rt = request.param
    s = InferenceStage([ModelConfig(name="traffic", stream="traffic", guard=False, runtime=rt),
                        ModelConfig(name="energy", stream="cabinet", guard=False, runtime=rt)])
    want = "numpy" if rt == "auto" else rt
    assert {m["runtime"] for m in s.status()["models"].values()} == {want}
    yield s
    s.close()


async def test_replays_samples_with_the_expected_outputs(stage: InferenceStage) -> None:
    assert stage.load_errors == []
    windows, expected, version = samples("traffic")
    got = []
    for w in windows:
        got.extend(await stage.on_window(w))
    assert len(got) == len(expected) == len(windows)
    for inf, want, w in zip(got, expected, windows, strict=True):
        assert inf.model == "traffic" and inf.version == version and inf.stream == "traffic"
        assert inf.window_start_ns == w.start_ns and not inf.shadow
        assert inf.outputs["speed_next"] == pytest.approx(want["speed_next"], abs=1e-3)
        assert inf.outputs["congestion_level"] == want["congestion_level"]
        assert inf.outputs["congestion"] == ["free", "slowing", "congested"][
            int(want["congestion_level"])]
        assert inf.latency_ms >= 0
    st = stage.status()["models"]["traffic"]
    assert st["runs"] == len(windows) and st["version"] == version
    assert st["last_outputs"]["speed_next"] == pytest.approx(expected[-1]["speed_next"], abs=1e-3)
    # The energy model saw no window of its stream.
    assert stage.status()["models"]["energy"]["runs"] == 0


@pytest.mark.parametrize("runs_on", ["worker", "loop"])
async def test_sessions_run_where_the_load_time_probe_put_them(
        stage: InferenceStage, runs_on: str) -> None:
    windows, expected, _ = samples("traffic")
    seen: list[str] = []
    model = stage._slots["traffic"].active
    original = model.run

    def spy(row):  # records the thread, runs the real session
        seen.append(threading.current_thread().name)
        return original(row)

    model.run = spy  # type: ignore[method-assign]
    model.runs_on = runs_on  # type: ignore[assignment]
    got = await stage.on_window(windows[0])
    if runs_on == "worker":
        assert seen and seen[0].startswith("edge-infer")
        assert threading.current_thread().name not in seen
    else:
        assert seen == [threading.current_thread().name]
    # The same outputs wherever it ran.
    assert got[0].outputs["speed_next"] == pytest.approx(expected[0]["speed_next"], abs=1e-3)
    assert stage.status()["models"]["traffic"]["runs_on"] == runs_on


def test_the_probe_keeps_a_slow_model_on_the_worker(stage: InferenceStage) -> None:
    from agent.pipeline.loaded_model import INLINE_MS

    model = stage._slots["traffic"].active
    st = stage.status()["models"]["traffic"]
    # The choice follows the measured p90 on the manifest's fill values.
    assert 0 <= st["probe_p90_ms"] <= st["probe_p99_ms"]
    assert st["runs_on"] == ("loop" if model.probe_p90_ms <= INLINE_MS else "worker")
    original = model.run

    def slow(row):  # the real session, then the CPU kept busy as a large model would
        out = original(row)
        t_end = time.perf_counter() + 2 * INLINE_MS / 1000
        while time.perf_counter() < t_end:
            pass
        return out

    model.run = slow  # type: ignore[method-assign]
    model.probe()
    assert model.runs_on == "worker" and model.probe_p90_ms > INLINE_MS


async def test_energy_anomaly_score_flags_a_spike(stage: InferenceStage) -> None:
    windows, _, _ = samples("energy")
    got = []
    for w in windows[:-1]:
        got.extend(await stage.on_window(w))
    assert "anomaly_score" not in got[0].outputs  # no forecast for the first window yet
    scores = [i.outputs["anomaly_score"] for i in got[1:]]
    assert max(scores) > 0 and sum(i.outputs["anomaly"] for i in got[1:]) <= 3
    last = windows[-1]
    spiked = Window(last.stream, last.start_ns, last.end_ns, last.channels, last.fused,
                    {**last.derived, "power_mean_w": got[-1].outputs["power_next_w"] + 20_000})
    (inf,) = await stage.on_window(spiked)
    assert inf.outputs["anomaly"] == 1.0 and inf.outputs["anomaly_score"] > 130


async def test_corrupt_reload_is_refused_and_the_previous_model_keeps_running(
        stage: InferenceStage, tmp_path: Path) -> None:
    windows, _, version = samples("traffic")
    await stage.on_window(windows[0])
    bad = variant(tmp_path, "traffic", "x")
    data = bytearray(bad.read_bytes())
    data[100] ^= 0x55
    bad.write_bytes(bytes(data))
    errors = stage.reload([ModelConfig(name="traffic", stream="traffic", path=str(bad)),
                           ModelConfig(name="energy", stream="cabinet")])
    assert len(errors) == 1
    assert "sha256" in errors[0] and str(bad) in errors[0] and version in errors[0]
    (inf,) = await stage.on_window(windows[1])
    assert inf.version == version
    assert stage.status()["errors"][-1] == errors[0]
    # History survived the refused reload: lag inputs are not filled.
    assert stage.status()["models"]["traffic"]["runs"] == 2


async def test_wrong_names_and_opset_are_refused(stage: InferenceStage, tmp_path: Path) -> None:
    windows, _, version = samples("traffic")
    names = variant(tmp_path, "traffic", "names")
    doc = json.loads(names.with_suffix(".json").read_text())
    doc["inputs"][4]["name"] = "speed_in_mean"
    names.with_suffix(".json").write_text(json.dumps(doc))
    opset = variant(tmp_path, "traffic", "opset")
    doc = json.loads(opset.with_suffix(".json").read_text())
    doc["opset"] = 19
    opset.with_suffix(".json").write_text(json.dumps(doc))
    for path, reason in ((names, "input names differ"), (opset, "graph opset 20 but the "
                                                                 "manifest says 19")):
        errors = stage.reload([ModelConfig(name="traffic", stream="traffic", path=str(path))])
        assert len(errors) == 1 and reason in errors[0]
        (inf,) = await stage.on_window(windows[0])
        assert inf.version == version
        windows = windows[1:]


async def test_hot_swap_to_a_new_version(stage: InferenceStage, tmp_path: Path) -> None:
    windows, _, version = samples("traffic")
    await stage.on_window(windows[0])
    new = variant(tmp_path, "traffic", "v2")
    assert stage.reload([ModelConfig(name="traffic", stream="traffic", path=str(new))]) == []
    (inf,) = await stage.on_window(windows[1])
    assert inf.version != version and inf.version == stage.versions()["traffic"]
    assert "energy" not in stage.versions()  # no longer configured


async def test_shadow_runs_beside_and_activate_switches(stage: InferenceStage,
                                                        tmp_path: Path) -> None:
    windows, _, version = samples("traffic")
    cand = variant(tmp_path, "traffic", "cand")
    errors = stage.reload([ModelConfig(name="traffic", stream="traffic", shadow=str(cand),
                                       guard=False)])
    assert errors == []
    got = await stage.on_window(windows[0])
    assert sorted((i.shadow, i.version == version) for i in got) == [(False, True),
                                                                     (True, False)]
    assert got[0].outputs["speed_next"] == pytest.approx(got[1].outputs["speed_next"])
    shadow_version = next(i.version for i in got if i.shadow)
    assert stage.status()["models"]["traffic"]["shadow"]["version"] == shadow_version
    stage.activate("traffic", force=True)  # one window is no evidence: forced
    (inf,) = await stage.on_window(windows[1])
    assert inf.version == shadow_version and not inf.shadow
    with pytest.raises(ValueError, match="no shadow candidate"):
        stage.activate("traffic", force=True)
    with pytest.raises(KeyError, match="no model named 'nope'"):
        stage.activate("nope")


async def test_bad_model_at_start_does_not_stop_the_others(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    shutil.copy(shipped_paths("traffic")[1], broken.with_suffix(".json"))
    s = InferenceStage([ModelConfig(name="traffic", stream="traffic", path=str(broken)),
                        ModelConfig(name="energy", stream="cabinet"),
                        ModelConfig(name="off", stream="x", enabled=False)])
    try:
        assert len(s.load_errors) == 1 and "broken.onnx" in s.load_errors[0]
        assert list(s.versions()) == ["energy"]
        windows, _, _ = samples("energy")
        assert len(await s.on_window(windows[0])) == 1
    finally:
        s.close()


async def test_a_stream_with_too_long_windows_is_reported(stage: InferenceStage) -> None:
    w = Window("traffic", 0, 600 * NS, {})
    assert await stage.on_window(w) == []
    assert await stage.on_window(Window("traffic", 600 * NS, 1200 * NS, {})) == []
    st = stage.status()
    assert st["models"]["traffic"]["failures"] == 2
    assert sum("longer than the model's 300 s" in e for e in st["errors"]) == 1


def point(mean: float, count: int, unit: str) -> ChannelStats:
    return ChannelStats(count, mean, mean, mean, mean, 0.0, unit)


async def test_every_10_s_window_gets_an_inference_from_the_first_on(
        stage: InferenceStage) -> None:
    got = []
    for k in range(120):  # 20 minutes of 10 s windows
        w = Window("traffic", (T0 + 10 * k) * NS, (T0 + 10 * k + 10) * NS, {
            "radar.speed_in": point(12.0 + k % 3, 2, "m/s"),
            "radar.speed_out": point(11.0, 1, "m/s"),
            "loop.occupancy": point(0.1, 1, "1"),
            "env.temperature": point(8.0, 1, "degC"),
            "env.humidity": point(70.0, 1, "%RH"),
        })
        (inf,) = await stage.on_window(w)
        assert inf.model == "traffic" and inf.window_start_ns == w.start_ns
        got.append(inf)
    # Lag inputs fill in as history builds: 7 of them (flow and speed 1-3 back, occupancy 1
    # back) have nothing in the first 300 s; lag1 arrives after 300 s, lag2 after 600 s, ...
    filled = [i.outputs["inputs_filled"] for i in got]
    assert filled == [7.0] * 30 + [4.0] * 30 + [2.0] * 30 + [0.0] * 30
    assert all(8 < float(i.outputs["speed_next"]) < 16 for i in got)
    st = stage.status()["models"]["traffic"]
    assert st["runs"] == 120 and st["inputs_filled"] == []
    assert st["last_window_start_ns"] == (T0 + 1190) * NS


@pytest.mark.parametrize(("name", "stream", "window_s"), [("traffic", "traffic", 10),
                                                          ("energy", "cabinet", 60)])
async def test_stream_windows_reproduce_the_training_outputs_at_300_s_boundaries(
        stage: InferenceStage, name: str, stream: str, window_s: int) -> None:
    windows, expected, _ = samples(name)
    parts = 300 // window_s
    got = []
    for w in windows:
        for sub in split_window(w, parts):
            got.extend(await stage.on_window(sub))
    assert len(got) == len(windows) * parts
    aligned = got[parts - 1 :: parts]  # the window that ends each sample window
    for inf, want, w in zip(aligned, expected, windows, strict=True):
        assert inf.window_start_ns == w.end_ns - window_s * NS
        for key, value in want.items():
            assert inf.outputs[key] == pytest.approx(value, rel=1e-3, abs=1e-3), (key, w.start_ns)
    if name == "energy":  # the anomaly score compares with the forecast made 300 s earlier
        assert ["anomaly_score" in i.outputs for i in got[:7]] == [False] * 5 + [True] * 2


def test_the_status_screen_shows_where_each_model_runs(stage: InferenceStage) -> None:
    from agent.control.view import model_rows

    rows = {r[0]: r for r in model_rows({"status": stage.status()})}
    for name in ("traffic", "energy"):
        runs_on = stage.status()["models"][name]["runs_on"]
        assert runs_on in ("loop", "worker")
        assert rows[name][1].endswith(f"({runs_on})")
