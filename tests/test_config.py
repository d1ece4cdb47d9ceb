"""Configuration: validation messages, environment overrides, the generated reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli.main import main
from agent.config.env import apply_env
from agent.config.load import ConfigError, load_config, parse_config
from agent.config.reference import BEGIN, END, reference_markdown

ROOT = Path(__file__).resolve().parent.parent

THREE_MISTAKES = """
[gateway]
id = "cab-1"

[[sensors]]
name = "env"
driver = "bme280"
bus = 1
address = 0x76

[[sensors]]
name = "power"
driver = "ina219"
bus = 1
address = 0x40
period_s = -1

[[sensors]]
name = "adc"
driver = "ads1115"
bus = 1
address = 0x99

[mqtt]
port = 70000
"""


def test_config_check_reports_each_mistake_on_its_own_line(tmp_path: Path, capsys) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(THREE_MISTAKES)
    assert main(["config", "check", str(f)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    joined = "\n".join(lines)
    assert "sensors[1].period_s: -1" in joined
    assert "sensors[2].address: 0x99 is not a valid 7-bit I2C address" in joined
    assert "mqtt.port: 70000" in joined
    for line in lines:
        assert line.startswith(f"{f}: ")


def test_valid_examples_pass(capsys) -> None:
    for example in sorted((ROOT / "agent" / "examples").glob("*.toml")):
        assert main(["config", "check", str(example)]) == 0, capsys.readouterr()


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[gateway]\nid = \n")
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={})
    assert "line 2" in str(ei.value.problems[0])


def test_cross_references_are_checked() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({
            "gateway": {"id": "g"},
            "sensors": [{"name": "a", "driver": "synthetic"}, {"name": "a", "driver": "synthetic"},
                        {"name": "r", "driver": "ops243"}],
            "streams": [{"name": "s", "sensors": ["a", "nope"]}],
            "models": [{"name": "traffic", "stream": "missing"}],
        })
    text = "\n".join(map(str, ei.value.problems))
    assert "sensors[1].name: 'a': duplicate sensor name" in text
    assert "sensors[2].port: a serial port is required for ops243" in text
    assert "streams[0].sensors[1]: 'nope': no sensor has this name" in text
    assert "models[0].stream: 'missing': no stream has this name" in text


def test_plaintext_to_a_remote_broker_is_refused() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"gateway": {"id": "g"}, "mqtt": {"host": "broker.example.net", "tls": False}})
    assert "mqtt.tls" in str(ei.value.problems[0])
    cfg = parse_config({"gateway": {"id": "g"}, "mqtt": {"host": "broker.example.net"}})
    assert cfg.mqtt.tls_enabled()
    assert not parse_config({"gateway": {"id": "g"}}).mqtt.tls_enabled()


def test_env_overrides_scalars_only(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('[gateway]\nid = "g"\n[[sensors]]\nname = "s"\ndriver = "synthetic"\n')
    cfg = load_config(f, env={"EDGE_AGENT__MQTT__HOST": "10.0.0.7",
                              "EDGE_AGENT__MQTT__PORT": "8883",
                              "EDGE_AGENT__SENSORS__0__PERIOD_S": "2.5",
                              "EDGE_AGENT__SENSORS": "oops",  # not a scalar key: ignored
                              "OTHER": "x"})
    assert cfg.mqtt.host == "10.0.0.7"
    assert cfg.mqtt.port == 8883
    assert cfg.sensors[0].period_s == 2.5
    assert len(cfg.sensors) == 1


def test_env_override_is_validated(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('[gateway]\nid = "g"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={"EDGE_AGENT__MQTT__PORT": "abc"})
    assert str(ei.value.problems[0]).startswith("mqtt.port: 'abc'")


def test_apply_env_keeps_tables() -> None:
    data = {"mqtt": {"host": "a"}}
    apply_env(data, {"EDGE_AGENT__MQTT": "x"})
    assert data == {"mqtt": {"host": "a"}}


def test_config_is_frozen() -> None:
    cfg = parse_config({"gateway": {"id": "g"}})
    with pytest.raises(Exception, match="frozen"):
        cfg.mqtt.host = "x"  # type: ignore[misc]


def test_readme_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), readme, re.S)
    assert m, "README.md lacks the generated configuration reference"
    assert m.group(1).strip() == reference_markdown().strip(), (
        "README configuration reference is stale: regenerate with `edge-agent config reference`")


def test_every_config_key_is_documented() -> None:
    for line in reference_markdown().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented key: {line}"


def test_env_override_errors_name_the_variable(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('[gateway]\nid = "g"\n[[sensors]]\nname = "s"\ndriver = "synthetic"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={"EDGE_AGENT__MQTT__PORT": "abc"})
    assert ei.value.lines()[0].startswith(
        "EDGE_AGENT__MQTT__PORT (environment): mqtt.port: 'abc'")
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={"EDGE_AGENT__MQTT__PORT": "99999", "EDGE_AGENT__GATEWAY__ID": "ok",
                            "EDGE_AGENT__SENSORS__0__PERIOD_S": "-1"})
    lines = ei.value.lines()
    assert any(x.startswith("EDGE_AGENT__MQTT__PORT (environment): mqtt.port") for x in lines)
    assert any(x.startswith("EDGE_AGENT__SENSORS__0__PERIOD_S (environment): "
                            "sensors[0].period_s") for x in lines)
    assert not any(x.startswith(str(f)) for x in lines), lines


@pytest.mark.parametrize(("var", "says"), [
    ("EDGE_AGENT__SENSORS__1__PERIOD_S", "sensors has 1 items, so there is no index 1"),
    ("EDGE_AGENT__SENSORS__PERIOD_S", "sensors is a list: name an item by its index"),
    ("EDGE_AGENT__GATEWAY__ID__X", "gateway.id is a value, not a table: it has no key 'x'"),
])
def test_an_env_override_that_names_no_key_is_an_error(tmp_path: Path, var: str,
                                                       says: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text('[gateway]\nid = "g"\n[[sensors]]\nname = "s"\ndriver = "synthetic"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={var: "2.5"})
    assert ei.value.lines() == [f"{var} (environment): {says}"]
