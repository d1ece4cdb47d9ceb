"""Models in the running agent: a bad new model file or config is refused, the old one runs on."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.runtime import Agent
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until, write_toml

MODELS = Path(__file__).resolve().parent.parent / "models"


def _errors(agent: Agent) -> list[str]:
    assert agent.infer is not None
    errors: list[str] = agent.infer.status()["errors"]
    return errors


async def test_bad_model_file_or_config_keeps_the_previous_model(tmp_path: Path,
                                                                 broker: Mosquitto) -> None:
    onnx = tmp_path / "energy.onnx"
    shutil.copy(MODELS / "energy.onnx", onnx)
    shutil.copy(MODELS / "energy.json", tmp_path / "energy.json")
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": "m", "driver": "synthetic", "period_s": 0.05,
                  "options": {"quantity": "active_power", "unit": "W", "base": 500.0}}],
        streams=[{"name": "energy", "sensors": ["m"], "window_s": 1}],
        models=[{"name": "energy", "stream": "energy", "path": str(onnx)}],
        runtime={"model_watch_s": 0.1, "clock": "trust", "health_period_s": 3600})
    cfg = write_toml(tmp_path / "agent.toml", data)
    async with running_agent(data, config_path=cfg) as agent:
        p = agent.pipeline
        assert p is not None
        await until(lambda: p.inferences_published >= 1, what="a first inference")
        assert agent.infer is not None
        version = agent.infer.versions()["energy"]

        # A corrupt file is copied over the model: refused, the running version stays.
        onnx.write_bytes(b"not an onnx model")
        await until(lambda: any("energy" in e for e in _errors(agent)),
                    what="the corrupt file refused")
        assert agent.infer.versions()["energy"] == version
        n = p.inferences_published
        await until(lambda: p.inferences_published > n + 1, what="inference goes on")

        # A reload whose model has the wrong opset in its manifest: refused too.
        bad = tmp_path / "other.onnx"
        shutil.copy(MODELS / "energy.onnx", bad)
        manifest = (MODELS / "energy.json").read_text().replace('"opset": 20', '"opset": 7')
        (tmp_path / "other.json").write_text(manifest)
        data["models"][0]["path"] = str(bad)
        write_toml(cfg, data)
        agent.request_reload()
        await until(lambda: agent.generation == 2 and agent.pipeline is not p, what="reload")
        p2 = agent.pipeline
        assert p2 is not None
        assert agent.infer.versions()["energy"] == version
        assert any("opset" in e for e in _errors(agent)), _errors(agent)
        await until(lambda: p2.inferences_published >= 1, what="inference after reload")
