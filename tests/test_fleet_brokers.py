"""`[[mqtt.brokers]]`, `mqtt.session_expiry_s` and `[commands]` in the config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config.load import ConfigError, parse_config
from agent.uplink.tls import UplinkConfigError, tls_context
from tests.harness import make_config


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return "\n".join(str(p) for p in info.value.problems)


def test_brokers_are_tried_after_host_and_port(tmp_path: Path) -> None:
    cfg = parse_config(make_config(tmp_path, 1883, mqtt={
        "brokers": [{"host": "127.0.0.2", "port": 1884}, {"host": "localhost"}]}))
    assert cfg.mqtt.addresses() == [("127.0.0.1", 1883), ("127.0.0.2", 1884),
                                     ("localhost", 1883)]
    assert cfg.mqtt.session_expiry_s == 7 * 86_400 and not cfg.mqtt.tls_enabled()


@pytest.mark.parametrize(("mqtt", "where"), [
    ({"brokers": [{"host": "b", "port": 0}]}, "mqtt.brokers[0].port"),
    ({"brokers": [{"port": 1883}]}, "mqtt.brokers[0].host"),
    ({"brokers": [{"host": "b", "extra": 1}]}, "mqtt.brokers[0].extra"),
    ({"brokers": [{"host": f"b{i}"} for i in range(9)]}, "mqtt.brokers"),
    ({"brokers": "b:1883"}, "mqtt.brokers"),
    ({"session_expiry_s": -1}, "mqtt.session_expiry_s"),
    ({"session_expiry_s": 10**30}, "mqtt.session_expiry_s"),
])
def test_bad_broker_settings_name_the_key(tmp_path: Path, mqtt: dict[str, Any],
                                          where: str) -> None:
    assert where in problems(make_config(tmp_path, 1883, mqtt=mqtt))


def test_a_remote_standby_turns_tls_on_and_plaintext_to_it_is_refused(tmp_path: Path) -> None:
    remote = {"brokers": [{"host": "standby.example", "port": 8883}]}
    cfg = parse_config(make_config(tmp_path, 1883, mqtt=remote))
    assert cfg.mqtt.tls_enabled()
    assert "standby.example" in problems(make_config(tmp_path, 1883,
                                                     mqtt={**remote, "tls": False}))
    off = cfg.mqtt.model_copy(update={"tls": False})
    with pytest.raises(UplinkConfigError, match=r"standby\.example"):
        tls_context(off)


def test_trusted_keys_are_checked(tmp_path: Path) -> None:
    bad = make_config(tmp_path, 1883, commands={"trusted_keys": [
        {"id": "k", "public_key": "not base64"}]})
    assert "commands.trusted_keys[0].public_key" in problems(bad)
