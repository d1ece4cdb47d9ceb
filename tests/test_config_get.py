"""The ``config.get`` cloud command answers the section it is asked for, or says it has none."""

from __future__ import annotations

from pathlib import Path

from agent.config.load import parse_config
from agent.generation import Pipeline
from tests.harness import make_config

GW = "gw-test"


def _pipeline(tmp_path: Path) -> Pipeline:
    data = make_config(tmp_path, 1883, mqtt={"credentials_file": "/etc/secret"})
    return Pipeline(parse_config(data))


async def test_one_section_or_all(tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    r = await p.commands.handle(GW, "config.get", b'{"id": "c1", "args": {"section": "outbox"}}')
    assert r.ok and r.result == {"outbox": p.cfg.outbox.model_dump(mode="json")}
    r = await p.commands.handle(GW, "config.get", b'{"id": "c2", "args": {"section": "mqtt"}}')
    assert r.ok and set(r.result) == {"mqtt"}
    assert "credentials_file" not in r.result["mqtt"]  # secrets stay out of every answer
    r = await p.commands.handle(GW, "config.get", b'{"id": "c3"}')
    assert r.ok and {"gateway", "mqtt", "outbox", "runtime"} <= set(r.result)


async def test_an_unknown_section_is_a_clear_error(tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    for section in ("nonesuch", "mqtt.host", "x" * 1000):
        payload = b'{"id": "c1", "args": {"section": "%s"}}' % section.encode()
        r = await p.commands.handle(GW, "config.get", payload)
        assert r.error is not None and r.error.code == "failed"
        assert "args.section" in r.error.message and "sections: gateway" in r.error.message
        assert len(r.error.message) < 400
