"""Feed message models, builders, topics, and the generated MQTT document."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from agent.feed import messages as feed
from agent.readings import ChannelStats, Inference, Reading, Window

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_790_000_000_123_456_000


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_mqtt_schemas",
                                                  ROOT / "docs" / "gen_mqtt_schemas.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _window() -> Window:
    good = ChannelStats(5, 21.5, 21.0, 22.0, 21.8, 0.3, "degC", suspect=1, bad=2)
    empty = ChannelStats(0, math.nan, math.nan, math.nan, math.nan, math.nan, "Pa")
    return Window("climate", T0 - 10_000_000_000, T0, {"bme.temperature": good,
                                                       "bme.pressure": empty},
                  derived={"dew_point": 11.2, "bad": math.inf}, flags=("partial",))


def test_window_message_round_trips_with_envelope() -> None:
    msg = feed.window_message("gw-1", _window()).seal(seq=7, boot_id="b00t", ts_ns=T0)
    body = json.loads(feed.encode(msg))
    assert body["schema"] == "edge-agent/window/1"
    assert body["msg_id"] == "b00t-7" and body["seq"] == 7 and body["boot_id"] == "b00t"
    assert body["gateway"] == "gw-1"
    assert body["ts"] == "2026-09-21T14:13:20.123456Z"
    assert body["start"] == "2026-09-21T14:13:10.123456Z"
    assert body["channels"]["bme.temperature"]["suspect"] == 1
    assert body["channels"]["bme.temperature"]["bad"] == 2
    # Non-finite statistics travel as null, never as the invalid JSON token NaN.
    assert body["channels"]["bme.pressure"]["mean"] is None
    assert body["derived"] == {"dew_point": 11.2, "bad": None}
    assert body["flags"] == ["partial"]
    assert "replayed" not in body
    again = feed.WindowMessage.model_validate(body)
    assert again == msg


def test_replayed_marker_keeps_msg_id_and_validates() -> None:
    msg = feed.window_message("gw-1", _window()).seal(seq=8, boot_id="b00t", ts_ns=T0)
    late = json.loads(feed.mark_replayed(feed.encode(msg)))
    assert late["replayed"] is True
    assert late["msg_id"] == msg.msg_id
    assert feed.WindowMessage.model_validate(late).replayed is True
    with pytest.raises(ValueError, match="JSON object"):
        feed.mark_replayed(b"[1, 2]")


def test_inference_reading_and_health_builders() -> None:
    inf = Inference("anomaly", "abc123", T0, {"score": math.nan, "label": "ok"}, 2.5,
                    stream="climate", shadow=True)
    m = feed.inference_message("gw", inf).seal(seq=1, boot_id="b", ts_ns=T0)
    body = json.loads(feed.encode(m))
    assert body["schema"] == "edge-agent/inference/1"
    assert body["outputs"] == {"score": None, "label": "ok"} and body["shadow"] is True
    r = Reading("radar", "speed", 12.5, "m/s", T0, 5, "suspect", ("spike",))
    body = json.loads(feed.encode(feed.reading_message("gw", "traffic", r).seal(
        seq=2, boot_id="b", ts_ns=T0)))
    assert (body["stream"], body["sensor"], body["quantity"]) == ("traffic", "radar", "speed")
    assert body["quality"] == "suspect" and body["reasons"] == ["spike"]
    h = feed.health_message("gw", {"outbox": {"rows": 3}}).seal(seq=3, boot_id="b", ts_ns=T0)
    assert json.loads(feed.encode(h))["health"] == {"outbox": {"rows": 3}}


def test_health_snapshot_that_is_not_json_fails_at_the_builder() -> None:
    with pytest.raises(ValueError):
        feed.health_message("gw", {"x": math.nan})


def test_seal_validates_the_sequence() -> None:
    with pytest.raises(ValidationError, match="seq"):
        feed.window_message("gw", _window()).seal(seq=0, boot_id="b", ts_ns=T0)


def test_topics_build_and_parse() -> None:
    t = feed.Topics("edge/site-a", "gw.01")
    assert t.status == "edge/site-a/gw.01/status"
    assert t.telemetry("climate") == "edge/site-a/gw.01/telemetry/climate"
    assert t.cmd_result("ping") == "edge/site-a/gw.01/cmd/ping/result"
    assert t.command_name("edge/site-a/gw.01/cmd/config.get") == "config.get"
    assert t.command_name("edge/site-a/gw.01/cmd/ping/result") is None
    assert t.command_name("edge/other/cmd/ping") is None
    for bad in ("a/b", "x+", "#", ""):
        with pytest.raises(ValueError, match="topic level"):
            t.raw(bad)
    with pytest.raises(ValueError, match="MQTT topic"):
        feed.Topics("edge", "gw+1")


def test_generated_docs_and_schema_files_are_current() -> None:
    gen = load_generator()
    assert gen.stale() == [], "run python docs/gen_mqtt_schemas.py"
    assert gen.main(["--check"]) == 0


def test_doc_generator_detects_a_stale_doc_or_schema_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gen = load_generator()
    doc = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
    stale = doc.replace('"schema": "edge-agent/window/1"', '"schema": "edge-agent/window/0"')
    assert stale != doc
    assert gen.render(stale) == doc
    with pytest.raises(ValueError, match="markers"):
        gen.render("no markers here")
    # The same check on a copy: an edited schema, a missing one and a leftover one are stale.
    schemas = tmp_path / "schemas"
    monkeypatch.setattr(gen, "SCHEMAS", schemas)
    monkeypatch.setattr(gen, "STATUS_SCHEMA", tmp_path / "status.schema.json")
    monkeypatch.setattr(gen, "DOC", tmp_path / "mqtt.md")
    (tmp_path / "mqtt.md").write_text(stale, encoding="utf-8")
    gen.write()
    assert gen.stale() == [] and (tmp_path / "mqtt.md").read_text(encoding="utf-8") == doc
    window = schemas / "window.schema.json"
    window.write_text(window.read_text().replace('"stream"', '"streams"'))
    (schemas / "health.schema.json").unlink()
    (schemas / "gone.schema.json").write_text("{}")
    assert {p.name for p in gen.stale()} == {"window.schema.json", "health.schema.json",
                                             "gone.schema.json"}
    assert gen.main(["--check"]) == 1


def _schema_file(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "docs" / "schemas" / f"{name}.schema.json").read_text())


def test_doc_examples_validate_against_the_models_and_the_schema_files() -> None:
    gen = load_generator()
    models = {m.name: m.model for m in gen.MESSAGES}
    seen = set()
    for name, _topic, body in gen._examples():
        models[name].model_validate(body)
        jsonschema.validate(body, _schema_file(name))
        seen.add(name)
    assert seen == set(models) - {"cmd-request"}


def test_every_json_message_type_has_a_schema_file_and_a_doc_link() -> None:
    gen = load_generator()
    doc = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
    kinds = {v for k, v in vars(feed).items() if k.startswith("SCHEMA_")}
    published = {m.model.model_json_schema(by_alias=True)["properties"]["schema"]["const"]
                 for m in gen.MESSAGES if m.direction == gen.PUBLISHED}
    assert kinds <= published, f"a feed message type without a schema file: {kinds - published}"
    for m in gen.MESSAGES:
        assert f"](schemas/{m.name}.schema.json)" in doc


def test_published_schemas_are_open_and_what_the_gateway_receives_is_strict() -> None:
    gen = load_generator()
    for m in gen.MESSAGES:
        text = (ROOT / "docs" / "schemas" / f"{m.name}.schema.json").read_text()
        closed = '"additionalProperties": false' in text
        assert closed == (m.direction != gen.PUBLISHED), m.name
    # A consumer validating with the files accepts a field a later minor version adds.
    gen_body = gen._examples()[0][2]
    jsonschema.validate({**gen_body, "added_in_1_1": 5,
                         "channels": {"bme.temperature": {
                             **gen_body["channels"]["bme.temperature"], "p95": 21.7}}},
                        _schema_file("window"))


def test_the_health_schema_and_the_status_schema_agree() -> None:
    health = _schema_file("health")
    status = json.loads((ROOT / "docs" / "status.schema.json").read_text())
    body = health["properties"]["health"]
    if "$ref" in body:
        body = health["$defs"][body["$ref"].rsplit("/", 1)[1]]
    assert body["required"] == status["required"]
    assert body["properties"] == status["properties"]
    for name, definition in status["$defs"].items():
        assert health["$defs"][name] == definition, name
