"""Technician commands against a running control server."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
from pathlib import Path

import pytest

from agent.cli import control as cli_control
from agent.control.view import status_schema
from tests.test_control import SCHEMA_FILE, FakeAgent, short_dir
from tests.waiting import until


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent")
    sub = p.add_subparsers(dest="command")
    cli_control.register(sub)
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


async def run_in_thread(argv: list[str]) -> int:
    # The commands block on the socket; the server needs this event loop meanwhile.
    return await asyncio.wait_for(asyncio.to_thread(run, argv), 20.0)




async def test_status_screen_shows_what_a_technician_needs(agent_sock, capsys) -> None:
    _, path = agent_sock
    assert await run_in_thread(["status", "--socket", str(path)]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    for text in ("edge-agent 0.1.0", "cabinet-17", "up 01:02:05", "/etc/edge-agent/agent.toml"):
        assert text in first, (text, first)
    assert "clock    synced" in out
    assert "uplink   connected  to mqtt.example.net:8883  last PUBACK 1.5 s ago" in out
    assert "outbox   depth 3 (window 3)  oldest 42 s  dropped 4" in out
    bme = next(line for line in out.splitlines() if line.startswith("bme "))
    for text in ("bme280", "up", "temperature 23.41 degC", "humidity 48.2 %RH"):
        assert text in bme, (text, bme)
    # The age grows from 0.8 s while the command starts up on a loaded machine.
    assert re.search(r"  \d+(\.\d)? s  ", bme), bme
    radar = next(line for line in out.splitlines() if line.startswith("radar "))
    for text in ("down", "speed 12.5 m/s [suspect]",
                 "7 (4 in a row): SerialTimeout: no frame within 2.0 s"):
        assert text in radar, (text, radar)
    assert re.search(r" 9\d s ", radar), radar
    model = next(line for line in out.splitlines() if line.startswith("traffic "))
    assert "3fa2c1d0" in model and "congestion=0.12" in model and "flow=840" in model
    assert "\x1b[" not in out, "no colour codes when the output is not a terminal"


async def test_status_json_validates_against_the_published_schema(agent_sock, capsys) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    _, path = agent_sock
    assert await run_in_thread(["status", "--json", "--socket", str(path)]) == 0
    snap = json.loads(capsys.readouterr().out)
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(snap, schema)
    assert snap["outbox"]["rows"] == 3
    broken = dict(snap, sensors=[{"name": "x"}])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    del snap["uplink"]
    with pytest.raises(jsonschema.ValidationError, match="uplink"):
        jsonschema.validate(snap, schema)


def test_published_schema_is_generated_from_the_models(capsys) -> None:
    assert run(["status", "--schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == status_schema()
    assert json.loads(SCHEMA_FILE.read_text()) == status_schema(), (
        "docs/status.schema.json is stale: regenerate it with "
        "`edge-agent status --schema > docs/status.schema.json`")


async def test_tail_prints_only_the_named_source(agent_sock, capsys) -> None:
    agent, path = agent_sock
    hub = agent.pipeline.tail
    job = asyncio.create_task(run_in_thread(["tail", "bme", "--count", "2", "--socket",
                                             str(path)]), name="tail-cli")
    await until(lambda: hub.active, 5.0, "tail subscription")
    hub.publish("reading", "radar", {"quantity": "speed", "value": 3.0, "unit": "m/s"})
    hub.publish("reading", "bme", {"quantity": "temperature", "value": 21.5, "unit": "degC",
                                   "ts_ns": 1_700_000_000_000_000_000, "quality": "good",
                                   "reasons": []})
    hub.publish("window", "bme", {"start_ns": 1_700_000_000_000_000_000, "flags": ["partial"],
                                  "channels": {"bme.temperature": {"mean": 21.4,
                                                                   "unit": "degC"}}})
    assert await job == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].split()[1:] == ["reading", "bme.temperature", "21.5", "degC", "good"]
    assert "window" in lines[1] and "bme.temperature=21.4 degC" in lines[1]
    assert "[partial]" in lines[1]
    assert lines[0][:12] <= lines[1][:12]  # stamped when they arrived: in time order
    assert "radar" not in "\n".join(lines)
    await until(lambda: not hub.active, 5.0, "tail unsubscribed after the CLI left")


async def test_tail_json_prints_the_items(agent_sock, capsys) -> None:
    agent, path = agent_sock
    hub = agent.pipeline.tail
    job = asyncio.create_task(run_in_thread(["tail", "--json", "-n", "1", "--socket",
                                             str(path)]), name="tail-cli")
    await until(lambda: hub.active, 5.0, "tail subscription")
    hub.publish("inference", "traffic", {"version": "3fa2c1d0", "outputs": {"flow": 1.0}})
    assert await job == 0
    item = json.loads(capsys.readouterr().out)
    assert item == {"kind": "inference", "name": "traffic", "version": "3fa2c1d0",
                    "outputs": {"flow": 1.0}}


async def test_outbox_stats(agent_sock, capsys) -> None:
    agent, path = agent_sock
    assert await run_in_thread(["outbox", "stats", "--socket", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "rows         3" in lines and "oldest       42 s ago" in lines, out
    assert "dropped      window 3, raw 1" in lines and "  by class   window 3" in lines, out
    assert not any(c in out for c in "{}'") and "None" not in out, out
    assert await run_in_thread(["outbox", "stats", "--json", "--socket", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == agent.outbox.stats()


async def test_outbox_export_writes_the_file(agent_sock, capsys, tmp_path: Path) -> None:
    agent, path = agent_sock
    agent.outbox.rows = [{"seq": i, "payload": "x" * 300} for i in range(2000)]  # > 1 chunk
    target = tmp_path / "backlog.jsonl"
    assert await run_in_thread(["outbox", "export", str(target), "--socket", str(path)]) == 0
    assert f"exported 2000 rows ({target.stat().st_size} bytes) to {target}" in \
        capsys.readouterr().out
    assert [json.loads(line) for line in target.read_text().splitlines()] == agent.outbox.rows
    assert not (tmp_path / "backlog.jsonl.part").exists()

    assert await run_in_thread(["outbox", "export", str(target), "--socket", str(path)]) == 2
    assert "exists; use --force" in capsys.readouterr().err
    target.write_text("old")
    assert await run_in_thread(["outbox", "export", str(target), "--force", "--socket",
                                str(path)]) == 0
    assert target.read_text().count("\n") == 2000


async def test_sensors_list(agent_sock, capsys) -> None:
    _, path = agent_sock
    assert await run_in_thread(["sensors", "list", "--socket", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["SENSOR", "DRIVER", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == ["bme", "radar"]
    assert " 120 " in lines[1]
    assert await run_in_thread(["sensors", "list", "radar", "--json", "--socket",
                                str(path)]) == 0
    [radar] = json.loads(capsys.readouterr().out)
    assert radar["state"] == "down" and radar["consecutive_failures"] == 4
    assert await run_in_thread(["sensors", "list", "nope", "--socket", str(path)]) == 1
    assert "no sensor named 'nope'" in capsys.readouterr().err


async def test_reload_reports_the_new_generation(agent_sock, capsys) -> None:
    agent, path = agent_sock
    assert await run_in_thread(["reload", "--socket", str(path)]) == 0
    assert agent.reload_requests == 1
    assert "reloaded: generation 2" in capsys.readouterr().out


async def test_reload_rejected_by_the_agent_is_a_failure(agent_sock, capsys) -> None:
    agent, path = agent_sock
    agent.accept_reload = False
    assert await run_in_thread(["reload", "--socket", str(path)]) == 1
    err = capsys.readouterr().err
    assert "reload rejected" in err and "sensors[0].driver" in err
    assert await run_in_thread(["reload", "--wait", "0", "--socket", str(path)]) == 0
    assert agent.reload_requests == 2


async def test_socket_is_found_from_the_config_file(agent_sock, capsys, tmp_path: Path) -> None:
    _, path = agent_sock
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[gateway]\nid = "gw"\n\n[control]\nsocket = "{path}"\n')
    assert await run_in_thread(["sensors", "list", "-c", str(cfg)]) == 0
    assert "radar" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "gw"\n\n[control]\nsockett = "x"\n')
    assert run(["status", "-c", str(bad)]) == 2
    assert "control.sockett: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["tail"], ["reload"],
                                  ["outbox", "stats"], ["outbox", "export", "out.jsonl"],
                                  ["sensors", "list"]])
def test_agent_not_running_exits_3_with_a_clear_message(argv, capsys, tmp_path: Path) -> None:
    missing = tmp_path / "control.sock"
    assert run([*argv, "--socket", str(missing)]) == 3
    assert f"edge-agent is not running (no socket at {missing})" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_stale_socket_is_reported_as_not_running(capsys) -> None:
    with short_dir() as d:
        path = d / "control.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
        assert run(["status", "--socket", str(path)]) == 3
    assert "edge-agent is not running (nobody listening on the stale socket" in \
        capsys.readouterr().err


def test_commands_mount_in_the_real_cli_beside_the_sensor_commands() -> None:
    from agent.cli.main import build_parser

    p = build_parser()
    args = p.parse_args(["sensors", "list", "--socket", "/x.sock"])
    assert args.socket == "/x.sock" and args.func.__name__ == "_sensors_list"
    args = p.parse_args(["sensors", "drivers"])
    assert args.func.__name__ == "cmd_drivers"
    assert p.parse_args(["outbox", "export", "f", "-c", "a.toml"]).config == "a.toml"


def test_terminal_screen_renders_the_same_facts_as_a_table() -> None:
    import io

    pytest.importorskip("rich")
    from agent.control.view import render_rich

    out = io.StringIO()
    render_rich(FakeAgent().snapshot(), out, width=200)
    text = out.getvalue()
    for fact in ("cabinet-17", "bme280", "temperature 23.41 degC", "down", "3fa2c1d0",
                 "last PUBACK 1.5 s ago", "depth 3"):
        assert fact in text, fact


@pytest.mark.parametrize(("value", "shown"), [
    (50000, "50000"), (840.0, "840"), (23.41, "23.41"), (1234.56, "1234.6"), (0.12, "0.12"),
    (123456789.0, "123456789"), (True, "True"), (None, "None"),
])
def test_numbers_are_shown_without_exponents(value, shown) -> None:
    from agent.control.view import fmt_number

    assert fmt_number(value) == shown


def test_tail_lines_are_in_columns_with_screen_units_and_derived_values() -> None:
    from agent.cli.control import format_item

    lines = [
        format_item({"kind": "reading", "name": "env", "quantity": "pressure",
                     "value": 101325.0, "unit": "Pa", "quality": "good"}),
        format_item({"kind": "reading", "name": "lights", "quantity": "power_factor",
                     "value": 0.98, "unit": "1", "quality": "good"}),
        format_item({"kind": "window", "name": "energy", "start_ns": 1_700_000_000 * 10**9,
                     "end_ns": 1_700_000_060 * 10**9, "flags": [],
                     "channels": {"env.pressure": {"mean": 100000.0, "unit": "Pa"}},
                     "derived": {"power_mean_w": 230.5, "energy_wh": 3.84}}),
        format_item({"kind": "inference", "name": "traffic", "version": "3fa2",
                     "outputs": {"speed_next": 12.3}, "latency_ms": 0.4}),
    ]
    assert lines[0].endswith("1013.2 hPa  good") and "Pa " not in lines[0].replace("hPa", "")
    assert lines[1].endswith("0.98  good") and " 1 " not in lines[1]
    assert "env.pressure=1000 hPa" in lines[2]
    assert "power_mean_w=230.5" in lines[2] and "energy_wh=3.84" in lines[2]
    # The name column starts at the same place on every line, whatever the kind.
    starts = {line.index(name) for line, name in zip(
        lines, ["env.pressure", "lights.power_factor", "energy", "traffic"], strict=True)}
    assert len(starts) == 1, lines
    assert sorted(line[:12] for line in lines) == [line[:12] for line in lines]  # time order


def test_status_shows_screen_units() -> None:
    from agent.control.view import sensor_value

    text = sensor_value({"last_values": {
        "pressure": {"value": 101325.0, "unit": "Pa", "quality": "good"},
        "power_factor": {"value": 0.5, "unit": "1", "quality": "good"}}})
    assert text == "pressure 1013.2 hPa, power_factor 0.5"
