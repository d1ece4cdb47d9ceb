"""The technician's CLI against a real agent running in the test on emulated devices."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from agent.cli.main import main
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent, until

ROOT = Path(__file__).resolve().parent.parent


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


async def test_cli_commands_against_a_running_agent(tmp_path: Path, broker: Mosquitto,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": "env", "driver": "bme280", "bus": "emulated", "address": 0x76,
                  "period_s": 0.1},
                 {"name": "gen", "driver": "synthetic", "period_s": 0.05}],
        streams=[{"name": "cabinet", "sensors": ["env", "gen"], "window_s": 1}],
        models=[{"name": "energy", "stream": "cabinet"}])
    sock = str(tmp_path / "control.sock")
    async with running_agent(data) as agent:
        await until(lambda: agent.pipeline is not None and agent.pipeline.windows_published >= 1,
                    what="a window")

        rc, out = await asyncio.to_thread(_cli, capsys, "status", "--json", "--socket", sock)
        assert rc == 0
        status = json.loads(out)
        schema = json.loads((ROOT / "docs" / "status.schema.json").read_text())
        jsonschema.validate(status, schema)
        names = {s["name"]: s for s in status["sensors"]}
        assert names["env"]["state"] == "up" and "temperature" in names["env"]["last_values"]
        assert status["agent"]["gateway"] == "gw-test"

        rc, out = await asyncio.to_thread(_cli, capsys, "status", "--socket", sock)
        assert rc == 0 and "env" in out and "gen" in out

        rc, out = await asyncio.to_thread(_cli, capsys, "sensors", "list", "--json",
                                          "--socket", sock)
        assert rc == 0 and {s["name"] for s in json.loads(out)} == {"env", "gen"}

        rc, out = await asyncio.to_thread(_cli, capsys, "tail", "env", "-n", "3", "--json",
                                          "--socket", sock)
        items = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert rc == 0 and len(items) == 3
        assert all(i["name"] == "env" and i["kind"] == "reading" for i in items)

        rc, out = await asyncio.to_thread(_cli, capsys, "outbox", "stats", "--json",
                                          "--socket", sock)
        assert rc == 0 and isinstance(json.loads(out), dict)

        rc, out = await asyncio.to_thread(_cli, capsys, "reload", "--wait", "1",
                                          "--socket", sock)
        assert rc != 0  # started without a file: the agent says it cannot reload
    rc, out = _cli(capsys, "status", "--socket", sock)
    assert rc == 3 and "not running" in out
