"""The site-calibration path on a running agent: its model windows land in the history and come
out of ``model history export`` as the training CSV; ``model activate`` promotes a shadow
candidate only when it won on the live windows, or with ``--force``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent.cli.main import main
from models.csvdata import read_csv
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until, write_toml
from tests.test_shadow import SLOPE_W, offset_model, ramp


def _shadow_config(tmp_path: Path, port: int, active: Path, cand: Path) -> dict[str, object]:
    return make_config(
        tmp_path, port,
        sensors=[{"name": "m", "driver": "synthetic", "period_s": 0.5,
                  "options": {"quantity": "active_power", "unit": "W", "base": 500.0}}],
        streams=[{"name": "cabinet", "sensors": ["m"], "window_s": 60}],
        models=[{"name": "energy", "stream": "cabinet", "path": str(active),
                 "shadow": str(cand), "activate_min_s": 3600}])


async def _cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(buf):
            return main(list(argv))

    rc = await asyncio.to_thread(run)
    return rc, buf.getvalue()


@pytest.mark.parametrize("winner", [True, False])
async def test_model_activate_asks_the_running_agent_and_respects_its_verdict(
        tmp_path: Path, broker: Mosquitto, winner: bool) -> None:
    active = offset_model(tmp_path, 100.0 if winner else SLOPE_W, "active")
    cand = offset_model(tmp_path, SLOPE_W if winner else 200.0, "cand")
    data = _shadow_config(tmp_path, broker.port, active, cand)
    cfg = write_toml(tmp_path / "agent.toml", data)
    sock = str(tmp_path / "control.sock")
    async with running_agent(data, config_path=cfg) as agent:
        assert agent.infer is not None
        before = agent.infer.versions()["energy"]
        # Three hours of live windows on a ramp, through the running agent's own stage.
        for k in range(180):
            await agent.infer.on_window(ramp(k))
        rc, out = await _cli("model", "activate", "energy", "--socket", sock, "--json")
        if winner:
            assert rc == 0, out
            assert json.loads(out)["activated"] == "energy"
            assert agent.infer.versions()["energy"] != before
            return
        assert rc == 1
        assert json.loads(out)["activated"] is False
        assert "does not beat" in json.loads(out)["reason"]
        assert agent.infer.versions()["energy"] == before
        rc, out = await _cli("model", "activate", "energy", "--socket", sock, "--force")
        assert rc == 0 and "forced" in out
        assert agent.infer.versions()["energy"] != before


async def test_the_running_agent_records_model_windows_and_the_cli_exports_them(
        tmp_path: Path, broker: Mosquitto) -> None:
    # The meter is off: only the replayed windows (of another year) reach the history.
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": "m", "driver": "synthetic", "period_s": 0.5, "enabled": False,
                  "options": {"quantity": "active_power", "unit": "W", "base": 500.0}}],
        streams=[{"name": "cabinet", "sensors": ["m"], "window_s": 60}],
        models=[{"name": "energy", "stream": "cabinet"}])
    cfg = write_toml(tmp_path / "agent.toml", data)
    async with running_agent(data, config_path=cfg) as agent:
        p = agent.pipeline
        assert p is not None and p.history is not None
        # Six 300 s model windows of a known ramp arrive as 60 s stream windows.
        for k in range(36):
            p.windows_q.put(ramp(k))
        await until(lambda: p.history is not None and p.history.rows_written >= 5,
                    what="model windows in the history")
    out = tmp_path / "site.csv"
    rc, text = await _cli("model", "history", "export", "-c", str(cfg), "-o", str(out),
                          "--json")
    assert rc == 0, text
    assert json.loads(text)["rows"] >= 5
    site = read_csv(out)
    power = site.col("power_mean_w")
    # Each model window's mean of the ramp's five 60 s levels: +20 W per window.
    assert power[1] - power[0] == pytest.approx(SLOPE_W)
    assert power[0] == pytest.approx(1000.0 + SLOPE_W * 2 * 60 / 300)
    rc, _ = await _cli("model", "history", "export", "-c", str(cfg), "-o", str(out))
    assert rc == 2  # exists: not replaced without --force
