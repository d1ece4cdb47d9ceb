"""The anomaly stage as the generation runs it: config checks, events as feed messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.config.load import ConfigError, parse_config
from agent.feed.messages import AnomalyMessage, anomaly_message
from agent.feed.sharing import SharingPolicy
from agent.pipeline.alarms import AnomalyStage
from agent.readings import ChannelStats, Window

NS = 10**9
T0 = 1_740_985_200
SENSORS = ("meter", "check", "lights", "cp1", "cp2")


def config(**gateway: Any) -> dict[str, Any]:
    return {
        "gateway": {"id": "g", **gateway},
        "sensors": [{"name": n, "driver": "synthetic"} for n in SENSORS],
        "streams": [{"name": "energy", "sensors": list(SENSORS), "window_s": 60,
                     "anomaly": {"main": "meter.active_power", "check": "check.active_power",
                                 "lights": "lights.active_power",
                                 "chargers": ["cp1.active_power", "cp2.active_power"]}}],
    }


def test_anomaly_needs_the_site_and_its_own_channels(tmp_path: Any) -> None:
    data = config()
    data["streams"][0]["anomaly"]["lights"] = "other.active_power"
    data["streams"][0]["window_s"] = 10
    data["streams"][0]["anomaly"]["chargers"] = ["cp1.active_power"]
    bad = tmp_path / "th.json"
    bad.write_text('{"version": 1, "stuck": NaN}')
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    text = "\n".join(map(str, ei.value.problems))
    assert "streams[0].anomaly: needs gateway.latitude and gateway.longitude" in text
    assert "streams[0].anomaly.lights: 'other.active_power': not a channel" in text
    assert "streams[0].window_s: 10: the anomaly thresholds are calibrated for 60 s windows" \
        in text
    assert "streams[0].anomaly.chargers: 1: the anomaly thresholds are calibrated for 2" in text
    data = config(latitude=52.5, longitude=13.4)
    data["streams"][0]["anomaly"]["thresholds"] = str(bad)
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert "NaN is not allowed" in str(ei.value.problems[0])
    parse_config(config(latitude=52.5, longitude=13.4, timezone="Europe/Berlin"))


def window(k: int, main_w: float, check_w: float) -> Window:
    def st(v: float) -> ChannelStats:
        return ChannelStats(6, v, v, v, v, 0.0, "W")

    start = (T0 + 60 * k) * NS
    return Window("energy", start, start + 60 * NS, {
        "meter.active_power": st(main_w), "check.active_power": st(check_w),
        "lights.active_power": st(0.0), "cp1.active_power": st(0.0),
        "cp2.active_power": st(0.0)})


def test_a_frozen_feed_meter_opens_one_event_published_as_a_feed_message() -> None:
    cfg = parse_config(config(latitude=52.5, longitude=13.4, timezone="Europe/Berlin"))
    stage = AnomalyStage(cfg)
    assert stage.streams == ["energy"]
    events = []
    for k in range(30):  # the check meter sees a moving load; the feed meter froze at k = 10
        load = 800.0 + 37.0 * (k % 7)
        events += stage.on_window(window(k, load if k < 10 else 1234.5, load))
    opened = [e for e in events if e["type"] == "meter_stuck"]
    assert len(opened) == 1 and opened[0]["end"] is None and opened[0]["channel"] == "main"
    # (800 W with nothing metered also reads as an unexplained load on this bare cabinet.)
    assert opened[0]["event_id"] in {e["event_id"] for e in stage.status()["open"]["energy"]}
    routes = SharingPolicy(cfg).route("anomaly", "energy", anomaly_message("g", opened[0]))
    assert [t for t, _ in routes] == ["anomaly/energy"]
    sealed = routes[0][1].seal(seq=1, boot_id="b", ts_ns=T0 * NS)
    assert isinstance(sealed, AnomalyMessage)
    body = json.loads(sealed.model_dump_json(by_alias=True))
    assert body["schema"] == "edge-agent/anomaly/1" and body["type"] == "meter_stuck"
