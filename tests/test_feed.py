"""Feed message models, builders, topics, and the generated MQTT document."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

from agent.feed import messages as feed
from agent.readings import ChannelStats, Inference, Reading, Window

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_790_000_000_123_456_000


def _load_generator() -> ModuleType:
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


def test_mqtt_doc_is_current() -> None:
    gen = _load_generator()
    doc = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
    assert gen.render(doc) == doc, "docs/mqtt.md is stale: run python docs/gen_mqtt_schemas.py"


def test_doc_generator_detects_a_stale_doc() -> None:
    gen = _load_generator()
    doc = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
    stale = doc.replace('"const": "edge-agent/window/1"', '"const": "edge-agent/window/0"')
    assert stale != doc
    assert gen.render(stale) == doc
    with pytest.raises(ValueError, match="markers"):
        gen.render("no markers here")


def test_doc_examples_validate_against_the_models() -> None:
    gen = _load_generator()
    models: dict[str, type[feed.FeedMessage]] = {
        "window": feed.WindowMessage, "inference": feed.InferenceMessage,
        "reading": feed.ReadingMessage, "health": feed.HealthMessage,
        "raw batch": feed.RawBatchMessage}
    for name, _topic, body in gen._examples():
        models[name].model_validate(body)
