"""`config check` and `run` on hostile and nonsense files: a clear line per problem with its
key path, exit 2, never a traceback, never a hang; and what `run` would refuse, `config check`
refuses first."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.main import main
from tests.harness import make_config, write_toml

ROOT = Path(__file__).resolve().parents[1]

VALID = """\
[gateway]
id = "gw-1"

[[sensors]]
name = "s"
driver = "synthetic"

[[streams]]
name = "st"
sensors = ["s"]

[outbox]
path = "{dir}/outbox.db"

[control]
socket = "{dir}/control.sock"
"""


def check(path: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = main(["config", "check", str(path)])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return rc, out.err.splitlines()


def valid(tmp_path: Path, extra: str = "") -> str:
    return VALID.format(dir=tmp_path) + extra


def cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def test_a_fifo_and_a_device_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.toml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        for args in (["config", "check", str(path)], ["run", "-c", str(path)]):
            done = cli(*args)  # a hang or an endless read fails on the timeout
            assert done.returncode == 2, done
            assert "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_a_huge_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "agent.toml"
    big.write_text(valid(tmp_path) + "#" * (2 * 1024 * 1024) + "\n")
    rc, lines = check(big, capsys)
    assert rc == 2 and len(lines) == 1 and "more than the 1048576 a config may have" in lines[0]


def test_non_utf8_names_the_byte_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "agent.toml"
    text = valid(tmp_path).replace('id = "gw-1"', 'id = "gw-1"\nsite = "Stra\udcdfe"')
    data = text.encode("utf-8", "surrogateescape")  # a Latin-1 sharp s
    f.write_bytes(data)
    rc, lines = check(f, capsys)
    offset = data.index(b"\xdf")
    assert rc == 2 and lines == [f"{f}: not UTF-8: byte offset {offset} (line 3, column 13): "
                                 "df (invalid continuation byte)"]


@pytest.mark.parametrize("value, reason", [
    ("[" * 10_000 + "]" * 10_000, "nested too deeply to parse"),
    ("{ a = " * 5_000 + "1" + " }" * 5_000, "nested too deeply to parse"),
    ("9" * 5000, "more digits than Python converts"),
])
def test_what_the_toml_parser_chokes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        value: str, reason: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(valid(tmp_path, f"\n[runtime]\nqueue_size = {value}\n"))
    rc, lines = check(f, capsys)
    assert rc == 2 and len(lines) == 1 and reason in lines[0]


def test_nesting_the_parser_survives_is_still_bounded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "agent.toml"
    deep = "[" * 40 + "1" + "]" * 40
    f.write_text(valid(tmp_path).replace('driver = "synthetic"',
                                         f'driver = "synthetic"\noptions = {{ x = {deep} }}'))
    rc, lines = check(f, capsys)
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith(f"{f}: sensors[0].options.x[0]") and "nested more than" in lines[0]


NONSENSE = {
    "sensors[0].period_s": ("[[sensors]]", "period_s = 1e-300"),
    "sensors[0].timeout_s": ("[[sensors]]", "timeout_s = inf"),
    "streams[0].window_s": ("[[streams]]", "window_s = 1e-9"),
    "runtime.queue_size": ("[runtime]", "queue_size = 9223372036854775807"),
    "runtime.health_period_s": ("[runtime]", "health_period_s = nan"),
    "runtime.down_after": ("[runtime]", "down_after = 1_000_000_000"),
    "runtime.backoff_initial_s": ("[runtime]", "backoff_initial_s = -inf"),
    "mqtt.replay_rate": ("[mqtt]", "replay_rate = 1e300"),
    "mqtt.max_payload_bytes": ("[mqtt]", "max_payload_bytes = 9_000_000_000"),
    "mqtt.poison_attempts": ("[mqtt]", "poison_attempts = 10_000_000"),
    "mqtt.topic_prefix": ("[mqtt]", f'topic_prefix = "{"a" * 80_000}"'),
    "mqtt.host": ("[mqtt]", f'host = "{"h" * 1000}"'),
    "outbox.max_rows": ("[outbox]", "max_rows = 100_000_000_000"),
    "outbox.max_bytes": ("[outbox]", "max_bytes = 1e3"),
    "gateway.site": ("[gateway]", f'site = "{"x" * 10_000}"'),
}


@pytest.mark.parametrize("key", sorted(NONSENSE))
def test_every_nonsense_setting_is_refused_with_its_key_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    table, line = NONSENSE[key]
    text = valid(tmp_path)
    if table not in text:
        text += f"\n{table}\n"
    text = text.replace(table, f"{table}\n{line}", 1)
    f = tmp_path / "agent.toml"
    f.write_text(text)
    rc, lines = check(f, capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{f}: {key}: "), lines
    assert len(lines[0]) < 400, "a long value is shown shortened"


@pytest.mark.parametrize("prefix", ["a/+/b", "a/#", "a//b", "/a", "$SYS", "a b"])
def test_topic_prefix_must_be_mqtt_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         prefix: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(valid(tmp_path, f'\n[mqtt]\ntopic_prefix = "{prefix}"\n'))
    rc, lines = check(f, capsys)
    assert rc == 2 and lines and lines[0].startswith(f"{f}: mqtt.topic_prefix: ")


def test_duplicate_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_config(tmp_path, 1883,
                       sensors=[{"name": "s", "driver": "synthetic"}] * 2,
                       streams=[{"name": "st", "sensors": ["s"]}] * 2,
                       models=[{"name": "traffic", "stream": "st"}] * 2)
    rc, lines = check(write_toml(tmp_path / "agent.toml", data), capsys)
    assert rc == 2
    assert [ln.split(": ", 1)[1] for ln in lines] == [
        "sensors[1].name: 's': duplicate sensor name",
        "streams[1].name: 'st': duplicate stream name",
        "models[1].name: 'traffic': duplicate model name"]


def test_what_run_would_refuse_is_refused_by_check(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Configs that validate on their own but cannot be built into a pipeline."""
    foreign = tmp_path / "photos.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.close()
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    cases = {
        "streams[0].fuse[0].channels[1]": {"streams": [{
            "name": "st", "sensors": ["s"],
            "fuse": [{"name": "f", "channels": ["s.temperature", "other.temperature"]}]}]},
        "models[0].path": {"models": [{"name": "traffic", "stream": "st",
                                       "path": "/dev/zero"}]},
        "outbox.path": {"outbox": {"path": str(foreign)}},
        "control.socket": {"control": {"socket": str(notes / "x" / "c.sock")}},
        "mqtt.credentials_file": {"mqtt": {"host": "127.0.0.1", "port": 1883,
                                           "credentials_file": "/dev/zero"}},
        "mqtt.ca_file": {"mqtt": {"host": "127.0.0.1", "port": 1883, "ca_file": str(tmp_path)}},
    }
    for key, sections in cases.items():
        data = make_config(tmp_path, 1883, sensors=[{"name": "s", "driver": "synthetic"}],
                           streams=[{"name": "st", "sensors": ["s"]}])
        data.update(sections)
        f = write_toml(tmp_path / "agent.toml", data)
        rc, lines = check(f, capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"{f}: {key}"), (key, lines)
    assert notes.read_text() == "keep me\n"


def test_run_refuses_a_foreign_outbox_file_and_leaves_it_alone(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an outbox\n")
    data = make_config(tmp_path, 1883, outbox={"path": str(notes)})
    f = write_toml(tmp_path / "agent.toml", data)
    done = cli("run", "-c", str(f))
    assert done.returncode == 2, done
    assert "outbox.path" in done.stderr and "Traceback" not in done.stderr
    assert notes.read_text() == "not an outbox\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml", "notes.txt"]


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    f = tmp_path / "agent.toml"
    f.write_text(valid(tmp_path, "\n[runtime]\nqueue_size = 1\n"))
    assert main(["config", "check", "--json", str(f)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"][0].startswith(f"{f}: runtime.queue_size: ")
    f.write_text(valid(tmp_path))
    assert main(["config", "check", "--json", str(f)]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(f), "ok": True, "problems": []}


@pytest.mark.parametrize("value", ["[" * 10_000 + "]" * 10_000, "9" * 5000, "nan", "\udcdf"])
def test_hostile_environment_overrides_are_refused_clearly(tmp_path: Path, value: str) -> None:
    from agent.config.load import ConfigError, load_config

    f = tmp_path / "agent.toml"
    f.write_text(valid(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(f, env={"EDGE_AGENT__RUNTIME__QUEUE_SIZE": value})
    assert [p.path for p in info.value.problems] == ["runtime.queue_size"]


def test_a_fifo_as_anomaly_thresholds_does_not_hang_the_check(tmp_path: Path) -> None:
    fifo = tmp_path / "thresholds.json"
    os.mkfifo(fifo)
    data = make_config(tmp_path, 1883, gateway={"id": "gw-1", "latitude": 50.1,
                                                "longitude": 8.7},
                       sensors=[{"name": "m", "driver": "synthetic"}],
                       streams=[{"name": "energy", "sensors": ["m"], "window_s": 60,
                                 "anomaly": {"main": "m.active_power", "lights": "m.lamps",
                                             "thresholds": str(fifo)}}])
    f = write_toml(tmp_path / "agent.toml", data)
    done = cli("config", "check", str(f))  # a blocked open fails on the timeout
    assert done.returncode == 2, done
    assert f"{f}: streams[0].anomaly.thresholds: " in done.stderr
    assert "not a regular file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("long", ["x" * 3000, "/" + "x" * 3000 + "/f"])
@pytest.mark.parametrize("table", ["outbox", "control", "history"])
def test_a_long_path_is_shown_shortened_in_every_check(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, long: str) -> None:
    key = {"outbox": "path", "control": "socket", "history": "path"}[table]
    text = "\n".join(line for line in valid(tmp_path).splitlines()
                     if not line.startswith(f"{key} = ") or table == "history")
    text += '\n[[models]]\nname = "energy"\nstream = "st"\n'
    text = (text.replace(f"[{table}]", f'[{table}]\n{key} = "{long}"', 1) if f"[{table}]" in text
            else text + f'\n[{table}]\n{key} = "{long}"\n')
    f = tmp_path / "agent.toml"
    f.write_text(text)
    rc, lines = check(f, capsys)
    assert rc == 2 and lines
    assert all(len(line) < 1000 for line in lines), [line[:200] for line in lines]
