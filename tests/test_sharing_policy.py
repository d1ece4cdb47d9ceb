"""Sharing policy: levels, audiences, withheld and rounded fields, the vehicle rules, health,
configuration errors and ``edge-agent sharing show`` (model outputs: test_sharing_inference)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import sharing as cli_sharing
from agent.cli.sharing import describe
from agent.config.load import ConfigError, parse_config
from agent.feed.messages import (
    Draft,
    encode,
    health_message,
    inference_message,
    reading_message,
    window_message,
)
from agent.feed.sharing import SharingPolicy, quantize
from agent.pipeline.windows import Windower
from agent.readings import ChannelStats, Inference, Reading, Window

GW = "gw-1"
EXAMPLE = Path(__file__).resolve().parents[1] / "agent" / "examples" / "gateway.toml"
T0 = 1_700_000_000 * 10**9
KMH = 0.2778

SENSORS = [
    {"name": "radar", "driver": "ops243", "port": "emulated"},
    {"name": "env", "driver": "synthetic"},
    {"name": "meter", "driver": "synthetic",
     "options": {"quantity": "active_power", "unit": "W"}},
]


def config(*streams: dict[str, Any], models: list[dict[str, Any]] | None = None) -> Any:
    return parse_config({"gateway": {"id": GW}, "sensors": SENSORS, "streams": list(streams),
                         "models": models or []})


def stats(count: int, mean: float, unit: str = "m/s", spread: float = 1.0) -> ChannelStats:
    if count == 0:
        return ChannelStats(0, math.nan, math.nan, math.nan, math.nan, math.nan, unit)
    return ChannelStats(count, mean, mean - spread, mean + spread, mean + 0.1, 0.37, unit)


def traffic_window(n_in: int, n_out: int, stream: str = "traffic",
                   extra: dict[str, ChannelStats] | None = None) -> Window:
    channels = {"radar.speed_in": stats(n_in, 13.41), "radar.speed_out": stats(n_out, 9.87),
                **(extra or {})}
    derived = {"vehicles": float(n_in + n_out), "flow_veh_h": (n_in + n_out) * 360.0,
               "speed_in_mean": 13.41 if n_in else math.nan,
               "speed_out_mean": 9.87 if n_out else math.nan,
               "speed_mean": 12.0 if n_in + n_out else math.nan}
    return Window(stream, T0, T0 + 10**10, channels, derived=derived)


def env_window(stream: str = "environment") -> Window:
    return Window(stream, T0, T0 + 10**10, {"env.temperature": stats(20, 21.234, "degC", 0.5)})


def reading(sensor: str, quantity: str, value: float, unit: str) -> Reading:
    return Reading(sensor, quantity, value, unit, T0 + 5, 5)


def body(draft: Draft[Any]) -> dict[str, Any]:
    """The JSON a subscriber gets: sealing validates the draft against its schema."""
    out: dict[str, Any] = json.loads(encode(draft.seal(seq=1, boot_id="b", ts_ns=T0)))
    return out


def routes(policy: SharingPolicy, kind: str, stream: str,
           draft: Draft[Any]) -> dict[str, dict[str, Any]]:
    return {topic: body(d) for topic, d in policy.route(kind, stream, draft)}


# -- levels -------------------------------------------------------------------------------------


def test_each_level_publishes_its_kinds_and_local_publishes_nothing() -> None:
    cfg = config({"name": "r", "sensors": ["env"], "share": "raw"},
                 {"name": "w", "sensors": ["env"]},
                 {"name": "d", "sensors": ["env"], "share": "derived"},
                 {"name": "l", "sensors": ["env"], "share": "local"},
                 models=[{"name": f"m{s}", "stream": s} for s in "rwdl"])
    policy = SharingPolicy(cfg)
    got: dict[str, set[str]] = {}
    for s in "rwdl":
        topics = [t for t, _ in policy.route("raw", s, reading_message(
            GW, s, reading("env", "temperature", 21.0, "degC")))]
        topics += [t for t, _ in policy.route("window", s, window_message(GW, env_window(s)))]
        topics += [t for t, _ in policy.route("inference", s, inference_message(
            GW, Inference(f"m{s}", "v1", T0, {"y": 1.0}, 1.0, stream=s)))]
        got[s] = set(topics)
    assert got == {"r": {"raw/r", "telemetry/r", "inference/mr"},
                   "w": {"telemetry/w", "inference/mw"},
                   "d": {"inference/md"},
                   "l": set()}
    counts = policy.stats()
    assert counts["l"]["local"] == 3 and counts["l"]["published"] == 0
    assert counts["w"]["local"] == 1 and counts["w"]["published"] == 2
    assert counts["r"]["published"] == 3


def test_raw_streams_for_follows_share_and_audiences() -> None:
    cfg = config({"name": "a", "sensors": ["env"], "share": "raw"},
                 {"name": "b", "sensors": ["env", "radar"],
                  "audiences": [{"name": "pub", "share": "window"},
                                {"name": "ops", "share": "raw"}]},
                 {"name": "c", "sensors": ["env"],
                  "audiences": [{"name": "pub", "share": "window"}]},
                 {"name": "d", "sensors": ["env"]})
    w = Windower(cfg.streams, cfg.sensors)
    assert w.raw_streams_for("env") == ["a", "b"]
    assert w.raw_streams_for("radar") == ["b"]
    assert [s.raw for s in cfg.streams] == [True, True, False, False]


# -- vehicles -----------------------------------------------------------------------------------


def test_defaults_hide_single_vehicles_in_windows() -> None:
    policy = SharingPolicy(config({"name": "traffic", "sensors": ["radar"]}))
    out = routes(policy, "window", "traffic", window_message(GW, traffic_window(5, 1)))
    w = out["telemetry/traffic"]
    speed_in, speed_out = w["channels"]["radar.speed_in"], w["channels"]["radar.speed_out"]
    # Extremes and last of a per-vehicle channel are single vehicles: withheld by default.
    assert (speed_in["min"], speed_in["max"], speed_in["last"]) == (None, None, None)
    assert speed_in["mean"] == pytest.approx(13.41) and speed_in["count"] == 5
    # One outbound vehicle: its mean would be its own speed (k = 3 by default).
    assert speed_out["count"] == 1
    assert all(speed_out[s] is None for s in ("mean", "min", "max", "last", "std"))
    assert "speed_out_mean" not in w["derived"]
    assert w["derived"]["speed_in_mean"] == pytest.approx(13.41)
    assert w["derived"]["vehicles"] == 6.0
    assert "redacted" in w["flags"]
    assert policy.stats()["traffic"]["redacted"] == 1


def test_min_vehicles_suppresses_small_windows_and_counts_them() -> None:
    policy = SharingPolicy(config(
        {"name": "traffic", "sensors": ["radar"]},
        {"name": "strict", "sensors": ["radar"], "min_vehicles": 10},
        {"name": "open", "sensors": ["radar"], "min_vehicles": 0, "drop": []}))
    for n, expected in ((1, False), (2, False), (3, True), (0, True)):
        w = window_message(GW, traffic_window(n, 0))
        assert bool(policy.route("window", "traffic", w)) is expected, n
    assert not policy.route("window", "strict", window_message(GW, traffic_window(6, 3, "strict")))
    assert policy.route("window", "strict", window_message(GW, traffic_window(6, 4, "strict")))
    # k off: a single vehicle is published as it is, the same draft passed on.
    one = window_message(GW, traffic_window(1, 0, "open"))
    ((_, same),) = policy.route("window", "open", one)
    assert same is one
    counts = policy.stats()
    assert counts["traffic"]["suppressed"] == 2 and counts["traffic"]["published"] == 2
    assert counts["strict"]["suppressed"] == 1


def test_vehicle_count_from_a_loop_detector_also_counts() -> None:
    policy = SharingPolicy(config({"name": "traffic", "sensors": ["env"]}))
    loop = Window("traffic", T0, T0 + 10**10, {"loop.vehicle_count": stats(2, 1.0, "count")},
                  derived={"vehicles": 2.0})
    assert policy.route("window", "traffic", window_message(GW, loop)) == []
    assert policy.stats()["traffic"]["suppressed"] == 1


def test_per_vehicle_readings_stay_local_unless_vehicle_events() -> None:
    cfg = config({"name": "t", "sensors": ["radar", "env"], "share": "raw"},
                 {"name": "e", "sensors": ["radar"], "share": "raw", "vehicle_events": True})
    policy = SharingPolicy(cfg)
    speed = reading_message(GW, "t", reading("radar", "speed_in", 13.9, "m/s"))
    temp = reading_message(GW, "t", reading("env", "temperature", 21.3, "degC"))
    assert policy.route("raw", "t", speed) == []
    ((topic, same),) = policy.route("raw", "t", temp)
    assert topic == "raw/t" and same is temp  # nothing to change: the same draft
    assert policy.stats()["t"]["withheld"] == 1
    ((topic, d),) = policy.route("raw", "e", reading_message(
        GW, "e", reading("radar", "speed_in", 13.9, "m/s")))
    assert topic == "raw/e" and body(d)["value"] == 13.9


# -- fields -------------------------------------------------------------------------------------


def test_explicit_drop_and_round_apply_to_stats_derived_outputs_and_readings() -> None:
    cfg = config({"name": "traffic", "sensors": ["radar", "env"], "share": "raw",
                  "vehicle_events": True, "min_vehicles": 0,
                  "drop": ["channels.*.min", "derived.flow_veh_h", "channels.env",
                           "outputs.congestion_level"],
                  "round": {"*.speed_*": KMH, "channels.*.std": 0.5}},
                 models=[{"name": "traffic", "stream": "traffic"}])
    policy = SharingPolicy(cfg)
    w = traffic_window(4, 2, extra={"env.temperature": stats(3, 20.0, "degC"),
                                    "meter.active_power": stats(3, 500.0, "W")})
    out = routes(policy, "window", "traffic", window_message(GW, w))["telemetry/traffic"]
    assert "env.temperature" not in out["channels"]  # the whole channel
    sin = out["channels"]["radar.speed_in"]
    assert sin["min"] is None and sin["count"] == 4  # counts are never rounded or withheld
    assert sin["max"] == pytest.approx(quantize(14.41, KMH))
    assert sin["max"] / KMH == pytest.approx(round(sin["max"] / KMH), abs=1e-9)
    assert sin["std"] == KMH  # the first matching pattern wins: *.speed_*, not channels.*.std
    assert out["channels"]["meter.active_power"]["std"] == 0.5
    assert out["channels"]["radar.speed_out"]["last"] == pytest.approx(quantize(9.97, KMH))
    assert "flow_veh_h" not in out["derived"]
    assert out["derived"]["speed_in_mean"] == pytest.approx(quantize(13.41, KMH))
    assert out["derived"]["vehicles"] == 6.0
    inf = inference_message(GW, Inference("traffic", "v1", T0,
                                          {"speed_next": 12.345, "congestion_level": "free"},
                                          1.0, stream="traffic"))
    o = routes(policy, "inference", "traffic", inf)["inference/traffic"]["outputs"]
    assert o == {"speed_next": pytest.approx(quantize(12.345, KMH))}
    r = routes(policy, "raw", "traffic", reading_message(
        GW, "traffic", reading("radar", "speed_out", 10.0, "m/s")))
    assert r["raw/traffic"]["value"] == pytest.approx(quantize(10.0, KMH))
    assert policy.route("raw", "traffic", reading_message(
        GW, "traffic", reading("env", "temperature", 20.0, "degC"))) == []
    counts = policy.stats()["traffic"]
    assert counts["rounded"] == 3 and counts["redacted"] == 2 and counts["withheld"] == 1


def test_an_empty_drop_replaces_the_default() -> None:
    policy = SharingPolicy(config({"name": "t", "sensors": ["radar"], "drop": []}))
    out = routes(policy, "window", "t", window_message(GW, traffic_window(5, 0, "t")))
    assert out["telemetry/t"]["channels"]["radar.speed_in"]["max"] == pytest.approx(14.41)
    assert "redacted" not in out["telemetry/t"]["flags"]


def test_windows_without_vehicles_pass_through_unchanged() -> None:
    policy = SharingPolicy(config({"name": "environment", "sensors": ["env"]}))
    draft = window_message(GW, env_window())
    ((topic, same),) = policy.route("window", "environment", draft)
    assert topic == "telemetry/environment" and same is draft


@given(value=st.floats(-1e6, 1e6), step=st.floats(1e-3, 1e3))
def test_quantize_lands_on_the_nearest_multiple(value: float, step: float) -> None:
    q = quantize(value, step)
    assert abs(q - value) <= step / 2 + 1e-6 * max(1.0, abs(value))
    assert q / step == pytest.approx(round(q / step), abs=1e-6)


# -- audiences ----------------------------------------------------------------------------------


def test_audiences_get_their_own_level_and_rules() -> None:
    cfg = config({"name": "traffic", "sensors": ["radar"], "round": {"*.speed_*": KMH},
                  "audiences": [{"name": "public", "share": "window", "min_vehicles": 5},
                                {"name": "ops", "share": "raw", "drop": [], "round": {},
                                 "min_vehicles": 0, "vehicle_events": True}]},
                 models=[{"name": "traffic", "stream": "traffic"}])
    policy = SharingPolicy(cfg)
    small = routes(policy, "window", "traffic", window_message(GW, traffic_window(3, 1)))
    assert set(small) == {"ops/telemetry/traffic"}  # 4 vehicles: below public's k of 5
    big = routes(policy, "window", "traffic", window_message(GW, traffic_window(5, 5)))
    assert set(big) == {"public/telemetry/traffic", "ops/telemetry/traffic"}
    assert big["public/telemetry/traffic"]["channels"]["radar.speed_in"]["max"] is None
    assert big["ops/telemetry/traffic"]["channels"]["radar.speed_in"]["max"] == 14.41
    assert big["public/telemetry/traffic"]["derived"]["speed_mean"] == pytest.approx(
        quantize(12.0, KMH))
    inf = inference_message(GW, Inference("traffic", "v1", T0, {"speed_next": 12.345}, 1.0,
                                          stream="traffic"))
    o = routes(policy, "inference", "traffic", inf)
    assert o["public/inference/traffic"]["outputs"]["speed_next"] == pytest.approx(
        quantize(12.345, KMH))
    assert o["ops/inference/traffic"]["outputs"]["speed_next"] == 12.345
    raw = routes(policy, "raw", "traffic", reading_message(
        GW, "traffic", reading("radar", "speed_in", 13.9, "m/s")))
    assert set(raw) == {"ops/raw/traffic"}
    counts = policy.stats()["traffic"]
    assert counts["suppressed"] == 1 and counts["local"] == 1


# -- health -------------------------------------------------------------------------------------


def _snapshot() -> dict[str, Any]:
    def sensor(name: str, values: dict[str, float]) -> dict[str, Any]:
        return {"name": name, "state": "up",
                "last_values": {q: {"value": v, "unit": "x", "quality": "good"}
                                for q, v in values.items()}}

    return {"sensors": [sensor("radar", {"speed_in": 13.9}), sensor("env", {"temperature": 21.0}),
                        sensor("meter", {"active_power": 500.0})],
            "models": {"status": {}, "last": {
                "traffic": {"version": "v1", "outputs": {"speed_next": 12.3, "level": "free"}},
                "energy:shadow": {"version": "v2", "outputs": {"power_next_w": 480.0}}}}}


def test_health_tells_no_more_than_the_feed() -> None:
    cfg = config({"name": "traffic", "sensors": ["radar"], "share": "raw",
                  "round": {"outputs.speed_next": 0.5}},
                 {"name": "environment", "sensors": ["env"], "share": "local"},
                 {"name": "energy", "sensors": ["meter"], "share": "raw"},
                 models=[{"name": "traffic", "stream": "traffic"},
                         {"name": "energy", "stream": "energy"}])
    policy = SharingPolicy(cfg)
    ((topic, d),) = policy.route("health", "", health_message(GW, _snapshot()))
    h = body(d)["health"]
    values = {s["name"]: s["last_values"] for s in h["sensors"]}
    assert "value" not in values["radar"]["speed_in"]  # a per-vehicle reading
    assert values["radar"]["speed_in"]["unit"] == "x"
    assert "value" not in values["env"]["temperature"]  # a local stream
    assert values["meter"]["active_power"]["value"] == 500.0  # published raw as it is
    assert h["models"]["last"]["traffic"]["outputs"] == {"level": "free"}  # rounded in the feed
    assert h["models"]["last"]["energy:shadow"]["outputs"] == {"power_next_w": 480.0}
    assert topic == "health" and policy.health_scrubbed == 1


def test_sensor_snapshots_for_command_replies_are_scrubbed_the_same_way() -> None:
    policy = SharingPolicy(config({"name": "traffic", "sensors": ["radar"]},
                                  {"name": "energy", "sensors": ["meter"], "share": "raw"}))
    sensors = _snapshot()["sensors"]
    out = {s["name"]: s["last_values"] for s in policy.scrub_sensors(sensors)}
    assert out["radar"]["speed_in"] == {"unit": "x", "quality": "good"}
    assert out["env"]["temperature"] == {"unit": "x", "quality": "good"}  # in no stream
    assert out["meter"]["active_power"]["value"] == 500.0
    assert sensors[0]["last_values"]["speed_in"]["value"] == 13.9  # the input is not changed


def test_health_passes_through_when_everything_is_published_as_it_is() -> None:
    policy = SharingPolicy(config({"name": "energy", "sensors": ["meter"], "share": "raw"}))
    snap = {"sensors": [{"name": "meter", "last_values": {"active_power": {"value": 1.0}}}]}
    draft = health_message(GW, snap)
    assert policy.route("health", "", draft) == [("health", draft)]


def test_unknown_kind_is_an_error_and_an_unknown_stream_stays_local() -> None:
    policy = SharingPolicy(config({"name": "environment", "sensors": ["env"]}))
    with pytest.raises(ValueError, match="'status' is not a message kind"):
        policy.route("status", "environment", window_message(GW, env_window()))
    assert policy.route("window", "nowhere", window_message(GW, env_window("nowhere"))) == []


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("stream", "where", "reason"), [
    ({"raw": True}, "streams[0]", 'the key `raw` was replaced by `share`: write share = "raw"'),
    ({"share": "all"}, "streams[0].share", "Input should be 'raw', 'window', 'derived' or"),
    ({"share": "raw", "audiences": [{"name": "p", "share": "window"}]}, "streams[0]",
     "`share` and `audiences` exclude each other"),
    ({"audiences": [{"name": "p", "share": "window"}, {"name": "p", "share": "raw"}]},
     "streams[0]", "audience 'p' is listed twice"),
    ({"audiences": [{"name": "telemetry", "share": "window"}]}, "streams[0].audiences[0].name",
     "'telemetry' is a topic level of its own"),
    ({"audiences": [{"name": "p"}]}, "streams[0].audiences[0].share", "required key is missing"),
    ({"drop": ["chanels.*.min"]}, "streams[0].drop", "'chanels.*.min' matches no field"),
    ({"drop": ["channels radar"]}, "streams[0].drop", "'channels radar' is not a field pattern"),
    ({"round": {"*.speed_*": 0}}, "streams[0].round.*.speed_*", "greater than 0"),
    ({"min_vehicles": -1}, "streams[0].min_vehicles", "greater than or equal to 0"),
])
def test_sharing_mistakes_are_reported_with_where(stream: dict[str, Any], where: str,
                                                  reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config({"name": "s", "sensors": ["env"], **stream})
    assert [p.path for p in exc.value.problems] == [where]
    assert reason in exc.value.problems[0].reason


def test_audience_keys_inherit_from_the_stream() -> None:
    plan = describe(config({"name": "s", "sensors": ["env"], "round": {"derived.x": 1.0},
                            "min_vehicles": 7,
                            "audiences": [{"name": "p", "share": "window"},
                                          {"name": "q", "share": "raw", "min_vehicles": 0}]}))
    p, q = plan["streams"][0]["namespaces"]
    assert (p["round"], p["min_vehicles"], q["round"], q["min_vehicles"]) == (
        {"derived.x": 1.0}, 7, {"derived.x": 1.0}, 0)
    assert p["drop_default"] and q["drop_default"]


# -- edge-agent sharing show --------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli_sharing.register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


HEAD = """
[gateway]
id = "cab-7"

[[sensors]]
name = "radar"
driver = "ops243"
port = "emulated"

[[sensors]]
name = "env"
driver = "synthetic"

[[models]]
name = "traffic"
stream = "traffic"

[mqtt]
topic_prefix = "city"
"""


def _cfg_file(tmp_path: Path, streams: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(HEAD + streams)
    return path


def test_show_prints_levels_topics_and_rules(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = _cfg_file(tmp_path, """
[[streams]]
name = "traffic"
sensors = ["radar"]
round = { "*.speed_*" = 0.2778 }

[[streams.audiences]]
name = "public"
share = "window"
min_vehicles = 5

[[streams.audiences]]
name = "ops"
share = "raw"
drop = []

[[streams]]
name = "environment"
sensors = ["env"]
share = "local"
""")
    assert run_cli(["sharing", "show", "-c", str(path)]) == 0
    text = capsys.readouterr().out
    assert "audience 'public': share window (windows, inferences)" in text
    assert "windows     -> city/cab-7/public/telemetry/traffic" in text
    assert "min, max and last of per-vehicle speed channels (default)" in text
    assert "rounded     *.speed_* to 0.2778" in text
    assert "windows counting 1..4 vehicles are withheld" in text
    assert "readings    -> city/cab-7/ops/raw/traffic (without per-vehicle speed readings)" in text
    assert "stream environment" in text and "local, nothing leaves the gateway" in text
    assert run_cli(["sharing", "show", "-c", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    env = plan["streams"][1]["namespaces"][0]
    assert env["kinds"] == [] and env["topics"] == {"raw": None, "window": None,
                                                    "inference": {}}
    public = plan["streams"][0]["namespaces"][0]
    assert public["topics"]["inference"] == {"traffic": "city/cab-7/public/inference/traffic"}
    assert plan["streams"][0]["vehicle_sensors"] == ["radar"]


def test_show_rejects_a_bad_config_with_exit_2(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _cfg_file(tmp_path, """
[[streams]]
name = "traffic"
sensors = ["radar"]
raw = true
""")
    assert run_cli(["sharing", "show", "-c", str(path)]) == 2
    assert "`raw` was replaced by `share`" in capsys.readouterr().out
