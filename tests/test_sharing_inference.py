"""Sharing policy and model outputs: a forecast made at a window the vehicle rule withheld is
withheld too, on every audience that withheld the window, and rounded like its window field
elsewhere; health tells no more than the feed."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from agent.config.load import parse_config
from agent.feed.messages import Draft, health_message, inference_message, window_message
from agent.feed.sharing import SharingPolicy, quantize
from agent.readings import ChannelStats, Inference, Window
from tests.test_sharing_policy import (
    EXAMPLE,
    GW,
    KMH,
    T0,
    body,
    config,
    routes,
    traffic_window,
)


def _one_vehicle_window(start_ns: int) -> Window:
    # The probe's case: one vehicle at 13.54 m/s in a 10 s window.
    return Window("traffic", start_ns, start_ns + 10**10,
                  {"radar.speed_in": ChannelStats(1, 13.54, 13.54, 13.54, 13.54, 0.0, "m/s")},
                  derived={"vehicles": 1.0, "speed_in_mean": 13.54, "speed_mean": 13.54})


def _forecast(start_ns: int) -> Draft[Any]:
    return inference_message(GW, Inference(
        "traffic", "v1", start_ns, {"speed_next": 13.876, "speed_next_model": 13.912,
                                    "congestion_level": 0.0, "inputs_filled": 0.0},
        1.0, stream="traffic"))


def test_an_inference_at_a_suppressed_window_is_suppressed_on_the_shipped_policy() -> None:
    cfg = parse_config(tomllib.loads(EXAMPLE.read_text()))  # the gateway's own example file
    policy = SharingPolicy(cfg)
    assert routes(policy, "window", "traffic", window_message(GW, _one_vehicle_window(T0))) == {}
    assert routes(policy, "inference", "traffic", _forecast(T0)) == {}
    # A window that is published lets the forecast made at it through.
    big = traffic_window(3, 2)
    later = T0 + 10**10
    published = routes(policy, "window", "traffic", window_message(GW, Window(
        "traffic", later, later + 10**10, big.channels, derived=big.derived)))
    assert set(published) == {"telemetry/traffic"}
    assert set(routes(policy, "inference", "traffic", _forecast(later))) == {"inference/traffic"}
    assert policy.stats()["traffic"]["suppressed"] == 2


def test_every_audience_that_withheld_the_window_withholds_its_forecast_rounded_elsewhere(
        ) -> None:
    cfg = config({"name": "traffic", "sensors": ["radar"], "round": {"derived.speed_*": KMH},
                  "audiences": [{"name": "public", "share": "window", "min_vehicles": 5},
                                {"name": "partner", "share": "window"},  # k = 3
                                {"name": "ops", "share": "raw", "drop": [], "round": {},
                                 "min_vehicles": 0}]},
                 models=[{"name": "traffic", "stream": "traffic"}])
    policy = SharingPolicy(cfg)
    windows = routes(policy, "window", "traffic", window_message(GW, _one_vehicle_window(T0)))
    assert set(windows) == {"ops/telemetry/traffic"}
    out = routes(policy, "inference", "traffic", _forecast(T0))
    assert set(out) == {"ops/inference/traffic"}
    assert out["ops/inference/traffic"]["outputs"]["speed_next"] == 13.876  # ops: as it is
    # Four vehicles: public (k = 5) withholds, partner (k = 3) publishes, rounded.
    four = traffic_window(3, 1)
    start = T0 + 10**10
    routes(policy, "window", "traffic", window_message(GW, Window(
        "traffic", start, start + 10**10, four.channels, derived=four.derived)))
    out = routes(policy, "inference", "traffic", _forecast(start))
    assert set(out) == {"partner/inference/traffic", "ops/inference/traffic"}
    partner = out["partner/inference/traffic"]["outputs"]
    # Rounded like derived.speed_mean, though no rule names an output.
    assert partner["speed_next"] == pytest.approx(quantize(13.876, KMH))
    assert partner["speed_next_model"] == pytest.approx(quantize(13.912, KMH))
    assert partner["congestion_level"] == 0.0 and partner["inputs_filled"] == 0.0


def test_health_does_not_show_a_forecast_that_the_feed_withheld() -> None:
    cfg = config({"name": "traffic", "sensors": ["radar"]},  # k = 3, no rounding
                 models=[{"name": "traffic", "stream": "traffic"}])
    policy = SharingPolicy(cfg)
    snap = {"models": {"status": {}, "last": {
        "traffic": {"version": "v1", "outputs": {"speed_next": 13.876}}}}}

    def health_outputs() -> dict[str, Any]:
        ((_t, d),) = policy.route("health", "", health_message(GW, snap))
        out: dict[str, Any] = body(d)["health"]["models"]["last"]["traffic"]["outputs"]
        return out

    routes(policy, "window", "traffic", window_message(GW, _one_vehicle_window(T0)))
    assert routes(policy, "inference", "traffic", _forecast(T0)) == {}
    assert health_outputs() == {}  # the last forecast was withheld: health does not tell it
    later = T0 + 10**10
    big = traffic_window(3, 2)
    routes(policy, "window", "traffic", window_message(GW, Window(
        "traffic", later, later + 10**10, big.channels, derived=big.derived)))
    assert routes(policy, "inference", "traffic", _forecast(later))
    assert health_outputs() == {"speed_next": 13.876}
