"""Shadow activation: a candidate is promoted only if it beat the active model and persistence
on the live windows both saw; ``force`` overrides. Candidates are small ONNX graphs made here:
"next = current + offset", which on a ramp of known slope is exact for one offset."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from agent.config.schema import ModelConfig
from agent.pipeline.infer import ActivationRefused, InferenceStage
from agent.readings import ChannelStats, Window
from models.manifest import META_INPUTS, META_OUTPUTS, sha256_bytes, shipped_paths

NS = 10**9
T0 = 1_740_985_200  # on a 300 s boundary
SLOPE_W = 20.0  # per 300 s window


def offset_model(tmp_path: Path, offset_w: float, tag: str) -> Path:
    """An energy model that forecasts ``power_mean_w + offset_w``, with a valid manifest."""
    _, man_path = shipped_paths("energy")
    doc = json.loads(man_path.read_text())
    names = [i["name"] for i in doc["inputs"]]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["features", "col"], ["now"], axis=1),
         helper.make_node("Add", ["now", "offset"], ["power_next_w"])],
        f"offset-{tag}",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", len(names)])],
        [helper.make_tensor_value_info("power_next_w", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("col", TensorProto.INT64, [1], [names.index("power_mean_w")]),
         helper.make_tensor("offset", TensorProto.FLOAT, [1], [offset_w])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", doc["opset"])])
    model.ir_version = 10
    for key, value in ((META_INPUTS, names), (META_OUTPUTS, ["power_next_w"])):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(model)
    dst = tmp_path / f"energy-{tag}.onnx"
    dst.write_bytes(model.SerializeToString())
    digest = sha256_bytes(dst.read_bytes())
    doc.update(sha256=digest, version=digest[:12], file=dst.name)
    dst.with_suffix(".json").write_text(json.dumps(doc))
    return dst


def ramp(k: int) -> Window:
    """Stream window k of 60 s on a load that rises SLOPE_W every 300 s."""
    start = (T0 + 60 * k) * NS
    power = 1000.0 + SLOPE_W * (60 * k) / 300
    stats = ChannelStats(60, power, power, power, power, 0.0, "W")
    return Window("cabinet", start, start + 60 * NS, {"meter.active_power": stats},
                  derived={"power_mean_w": power})


async def shadow_run(tmp_path: Path, active_offset: float, cand_offset: float,
                     minutes: int) -> InferenceStage:
    active = offset_model(tmp_path, active_offset, "active")
    cand = offset_model(tmp_path, cand_offset, "cand")
    stage = InferenceStage([ModelConfig(name="energy", stream="cabinet", path=str(active),
                                        shadow=str(cand), activate_min_s=3600)])
    assert stage.load_errors == []
    for k in range(minutes):
        await stage.on_window(ramp(k))
    return stage


async def test_a_candidate_that_wins_on_live_windows_is_activated(tmp_path: Path) -> None:
    # The active model overshoots by 100 W, the candidate is exact (the ramp's +20 W).
    stage = await shadow_run(tmp_path, 100.0, SLOPE_W, minutes=180)
    try:
        cmp = stage.status()["models"]["energy"]["shadow"]["comparison"]
        assert cmp["candidate_mae"] < 1.0 < cmp["persistence_mae"] < cmp["active_mae"]
        reason = stage.activate("energy")
        assert "wins" in reason
        assert stage.status()["models"]["energy"]["shadow"] is None
    finally:
        stage.close()


async def test_a_candidate_that_loses_is_refused_unless_forced(tmp_path: Path) -> None:
    # The candidate overshoots by 200 W: worse than persistence (20 W) and the exact active.
    stage = await shadow_run(tmp_path, SLOPE_W, 200.0, minutes=180)
    try:
        before = stage.versions()["energy"]
        with pytest.raises(ActivationRefused, match="does not beat"):
            stage.activate("energy")
        assert stage.versions()["energy"] == before
        stage.activate("energy", force=True)
        assert stage.versions()["energy"] != before
    finally:
        stage.close()


async def test_too_few_live_windows_refuse_activation(tmp_path: Path) -> None:
    stage = await shadow_run(tmp_path, 100.0, SLOPE_W, minutes=30)  # half an hour < 3600 s
    try:
        with pytest.raises(ActivationRefused, match="needed"):
            stage.activate("energy")
    finally:
        stage.close()
