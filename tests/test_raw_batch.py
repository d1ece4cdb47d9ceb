"""The batched raw lane: bounds (count, bytes, time), per-reading quality, the sharing policy on
every reading of a batch, and a running agent's raw feed in both formats."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from agent.config.load import ConfigError, parse_config
from agent.feed.messages import Draft, RawBatchMessage, encode, mark_replayed
from agent.feed.raw_batch import HOLD_MAX_NS, RawBatcher, readings_of
from agent.feed.sharing import SharingPolicy
from agent.readings import Reading
from tests.broker import Mosquitto
from tests.harness import feed_of, make_config, running_agent, until

GW = "gw-test"
T0 = 1_790_000_000_123_456_789


class Mono:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def batcher(**kw: Any) -> tuple[RawBatcher, list[tuple[str, Any]], Mono]:
    out: list[tuple[str, Any]] = []
    mono = Mono()
    args: dict[str, Any] = {"max_readings": 500, "max_bytes": 64 * 1024, "linger_ms": 0, **kw}
    return RawBatcher(GW, lambda s, d: out.append((s, d)), mono_ns=mono, **args), out, mono


def body(draft: Any, seq: int = 7) -> dict[str, Any]:
    return json.loads(encode(draft.seal(seq=seq, boot_id="0123456789ab", ts_ns=T0)))


def reading(i: int, **kw: Any) -> Reading:
    args: dict[str, Any] = {"sensor": "s0", "quantity": "temperature", "value": 20.0 + i / 8,
                            "unit": "degC", "ts_ns": T0 + i * 1_000_003, "mono_ns": i, **kw}
    return Reading(**args)


def test_a_batch_keeps_every_reading_exactly_with_its_quality() -> None:
    b, out, _ = batcher()
    sent = [reading(0), reading(1, quality="suspect", reasons=("spike",)),
            reading(2, sensor="s1", quantity="humidity", unit="%RH", value=55.5),
            reading(3, value=math.nan, quality="bad", reasons=("not_finite",)),
            reading(4, ts_ns=T0 - 5_000)]  # earlier than the first: a negative offset
    for r in sent:
        b.add("fast", r)
    assert not out and len(b) == 5
    assert b.flush_due(caught_up=True) is None
    ((stream, draft),) = out
    msg = body(draft)
    assert stream == "fast" and msg["schema"] == "edge-agent/raw-batch/1" and msg["seq"] == 7
    assert len(msg["channels"]) == 2
    got = readings_of(msg)
    assert [g["sampled_ns"] for g in got] == [r.ts_ns for r in sent]
    assert [(g["sensor"], g["quantity"], g["unit"]) for g in got] == [
        (r.sensor, r.quantity, r.unit) for r in sent]
    assert [g["value"] for g in got] == [20.0, 20.125, 55.5, None, 20.5]
    assert [(g["quality"], g["reasons"]) for g in got] == [
        ("good", []), ("suspect", ["spike"]), ("good", []), ("bad", ["not_finite"]),
        ("good", [])]
    RawBatchMessage.model_validate(msg)  # the published JSON is the documented schema
    # Sealed without validating the rows again, yet byte for byte what validation gives.
    plain = Draft(draft.model, dict(draft.fields))
    assert body(plain) == msg and encode(plain.seal(seq=7, boot_id="0123456789ab", ts_ns=T0)) \
        == encode(draft.seal(seq=7, boot_id="0123456789ab", ts_ns=T0))
    with pytest.raises(ValueError, match="quality 'fine'"):
        b.add("fast", reading(9, quality="fine"))
    b.flush()
    assert len(b) == 0 and len(out) == 1  # nothing half-started is sealed
    assert (b.batches, b.readings, len(b)) == (1, 5, 0)


def test_count_bound_seals_at_once_and_streams_batch_apart() -> None:
    b, out, _ = batcher(max_readings=3)
    for i in range(7):
        b.add("a", reading(i))
        b.add("b", reading(i, sensor="s9"))
    assert [(s, len(d.fields["readings"])) for s, d in out] == [("a", 3), ("b", 3)] * 2
    b.flush()
    assert [(s, len(d.fields["readings"])) for s, d in out[4:]] == [("a", 1), ("b", 1)]
    assert b.readings == 14


@pytest.mark.parametrize("max_bytes", [1024, 2000, 5000])
def test_byte_bound_holds_for_the_encoded_payload_even_replayed(max_bytes: int) -> None:
    b, out, _ = batcher(max_bytes=max_bytes)
    long = "x" * 60
    for i in range(400):  # long names, long reasons, long floats, non-ASCII units
        b.add("s" * 64, reading(i, sensor=f"n{i % 5}{long}", quantity=f"q{long}",
                                unit="µg/m³\x01", value=-1.2345678901234567e-300 * (i + 1),
                                reasons=("spike", "clock_unsynced") * (i % 3)))
    b.flush()
    sizes = [len(mark_replayed(encode(d.seal(seq=2**62, boot_id="b" * 40, ts_ns=T0))))
             for _, d in out]
    assert sum(len(d.fields["readings"]) for _, d in out) == 400
    assert max(sizes) <= max_bytes
    assert len(out) < 400  # batched, not one message per reading


def test_time_bounds_linger_and_hold_while_behind() -> None:
    b, out, mono = batcher(linger_ms=50)
    b.add("a", reading(0))
    mono.ns = 20_000_000
    b.add("a", reading(1))
    wait = b.flush_due(caught_up=True)
    assert not out and wait == pytest.approx(0.030)
    mono.ns = 50_000_000
    assert b.flush_due(caught_up=False) is None
    assert [len(d.fields["readings"]) for _, d in out] == [2]
    # linger 0: sealed once the pipeline caught up; while it is behind, after HOLD_MAX_NS.
    b, out, mono = batcher(linger_ms=0)
    b.add("a", reading(0))
    assert b.flush_due(caught_up=False) == pytest.approx(HOLD_MAX_NS / 1e9)
    mono.ns = HOLD_MAX_NS
    b.flush_due(caught_up=False)
    assert len(out) == 1


def sharing_config(**stream: Any) -> Any:
    return parse_config({
        "gateway": {"id": GW},
        "sensors": [{"name": n, "driver": "synthetic"} for n in ("radar", "env")],
        "streams": [{"name": "t", "sensors": ["radar", "env"], "share": "raw", **stream}]})


def test_sharing_applies_to_every_reading_of_a_batch() -> None:
    policy = SharingPolicy(sharing_config(round={"channels.env.temperature.value": 0.5},
                                          drop=["channels.env.humidity"]))
    b, out, _ = batcher()
    for i in range(4):
        b.add("t", reading(i, sensor="radar", quantity="speed_in", unit="m/s", value=12.0 + i))
        b.add("t", reading(i, sensor="env", value=20.1 + i / 10))
        b.add("t", reading(i, sensor="env", quantity="humidity", unit="%RH", value=40.0))
    b.flush()
    ((_, draft),) = out
    ((topic, routed),) = policy.route("raw", "t", draft)
    got = readings_of(body(routed))
    assert topic == "raw/t"
    # Per-vehicle speeds need vehicle_events; the dropped channel is gone; the rest rounded.
    assert {(g["sensor"], g["quantity"]) for g in got} == {("env", "temperature")}
    assert [g["value"] for g in got] == [20.0, 20.0, 20.5, 20.5]
    counts = policy.stats()["t"]
    assert counts["withheld"] == 8 and counts["published"] == 1 and counts["rounded"] == 1
    # A batch of withheld readings only is not published at all.
    b.add("t", reading(9, sensor="radar", quantity="speed_in", unit="m/s", value=3.0))
    b.flush()
    assert policy.route("raw", "t", out[-1][1]) == []
    assert policy.stats()["t"]["withheld"] == 9


def test_a_batch_no_rule_touches_passes_as_the_same_draft() -> None:
    policy = SharingPolicy(sharing_config(drop=[]))
    b, out, _ = batcher()
    b.add("t", reading(0, sensor="env"))
    b.flush()
    ((_, routed),) = policy.route("raw", "t", out[0][1])
    assert routed is out[0][1]


@pytest.mark.parametrize(("raw", "where"), [
    ({"format": "lines"}, "raw.format"), ({"max_readings": 0}, "raw.max_readings"),
    ({"linger_ms": -1}, "raw.linger_ms"), ({"max_bytes": 10**20}, "raw.max_bytes"),
    ({"linger_ms": math.inf}, "raw.linger_ms"), ({"batch": 1}, "raw.batch")])
def test_bad_raw_settings_are_refused_by_name(raw: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"gateway": {"id": GW}, "raw": raw})
    assert [p.path for p in e.value.problems] == [where]


@pytest.mark.parametrize("fmt", ["batch", "reading"])
async def test_running_agent_feeds_raw_readings_in_either_format(
        tmp_path: Path, broker: Mosquitto, fmt: str) -> None:
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": f"g{i}", "driver": "synthetic", "period_s": 0.01,
                  "options": {"burst": 5}} for i in range(2)],
        streams=[{"name": "s", "sensors": ["g0", "g1"], "window_s": 1, "share": "raw"}],
        raw={"format": fmt})
    async with feed_of(broker.port, "t/gw-test/raw/#", f"raw-{fmt}") as feed:
        async with running_agent(data) as agent:
            await until(lambda: sum(len(readings_of(m)) for m in feed) >= 500, 20,
                        "500 readings in the feed")
            pipeline = agent.pipeline
        assert pipeline is not None
        await until(lambda: len(feed) >= pipeline.raw_published, 10, "every raw message")
    # Across the backlog and live lanes the cloud restores order by seq (docs/mqtt.md).
    got = [r for m in sorted(feed, key=lambda m: m["seq"]) for r in readings_of(m)]
    # Every reading the lane took reached the cloud once, in order per sensor.
    assert len(got) == pipeline.raw_readings
    for sensor in ("g0", "g1"):
        ts = [r["sampled_ns"] for r in got if r["sensor"] == sensor]
        assert ts == sorted(ts) and len(ts) > 100
    seqs = [m["seq"] for m in feed]
    assert len(set(seqs)) == len(seqs) == pipeline.raw_published
    if fmt == "batch":
        assert {m["schema"] for m in feed} == {"edge-agent/raw-batch/1"}
        assert len(feed) < len(got) / 3  # one seq, one row, one PUBACK per many readings
    else:
        assert {m["schema"] for m in feed} == {"edge-agent/reading/1"}
        assert len(feed) == len(got)
