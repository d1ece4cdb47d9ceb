"""The hand-written Sparkplug B codec against the specification's schema compiled by protoc
(an independent decoder and encoder), and against hostile bytes."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.load import ConfigError, parse_config
from agent.readings import Reading
from agent.sparkplug.codec import (
    DataType,
    Metric,
    Payload,
    SparkplugDecodeError,
    decode,
    encode,
)
from agent.sparkplug.node import BDSEQ, REBIRTH, EdgeNode
from agent.sparkplug.session import load_bd_seq, save_bd_seq
from tests import sparkplug_oracle as oracle
from tests.harness import make_config

U64 = st.integers(0, 2**64 - 1)
NAMES = st.text(min_size=1, max_size=40)


def metric_strategy() -> st.SearchStrategy[Metric]:
    typed = st.one_of(
        st.tuples(st.just(DataType.INT32), st.integers(-(2**31), 2**31 - 1)),
        st.tuples(st.just(DataType.UINT32), st.integers(0, 2**32 - 1)),
        st.tuples(st.just(DataType.INT64), st.integers(-(2**63), 2**63 - 1)),
        st.tuples(st.just(DataType.UINT64), U64),
        st.tuples(st.just(DataType.DOUBLE), st.floats(allow_nan=False)),
        st.tuples(st.just(DataType.FLOAT), st.floats(width=32, allow_nan=False)),
        st.tuples(st.just(DataType.BOOLEAN), st.booleans()),
        st.tuples(st.just(DataType.STRING), st.text(max_size=50)),
        st.tuples(st.just(DataType.DOUBLE), st.none()),
    )
    return st.builds(
        lambda name, tv, ts, hist, unit: Metric(
            name, tv[0], tv[1], ts, is_historical=hist,
            properties={} if unit is None else {"engUnit": (DataType.STRING, unit)}),
        NAMES, typed, st.none() | U64, st.booleans(), st.none() | st.text(max_size=10))


def signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


@settings(max_examples=300, deadline=None)
@given(st.lists(metric_strategy(), max_size=8), st.none() | U64, st.none() | st.integers(0, 255))
def test_protoc_decoder_reads_what_we_encode(metrics: list[Metric], ts: int | None,
                                             seq: int | None) -> None:
    got = oracle.parse(encode(Payload(metrics, ts, seq)))
    assert got.HasField("timestamp") == (ts is not None)
    if ts is not None:
        assert got.timestamp == ts
    if seq is not None:
        assert got.seq == seq
    assert len(got.metrics) == len(metrics)
    for want, m in zip(metrics, got.metrics, strict=True):
        assert m.name == want.name
        assert m.datatype == want.datatype
        assert m.is_historical == want.is_historical
        if want.timestamp is not None:
            assert m.timestamp == want.timestamp
        v = oracle.value(m)
        if want.value is None:
            assert m.is_null and v is None
        elif want.datatype is DataType.INT32:
            assert signed(v, 32) == want.value
        elif want.datatype is DataType.INT64:
            assert signed(v, 64) == want.value
        elif want.datatype is DataType.FLOAT:
            assert v == want.value or (math.isinf(v) and math.isinf(want.value))
        else:
            assert v == want.value
        if want.properties:
            assert list(m.properties.keys) == ["engUnit"]
            assert m.properties.values[0].type == DataType.STRING
            assert m.properties.values[0].string_value == want.properties["engUnit"][1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NAMES, st.booleans(), st.none() | U64), max_size=5),
       st.none() | st.integers(0, 255))
def test_we_read_what_protoc_encodes(metrics: list[tuple[str, bool, int | None]],
                                     seq: int | None) -> None:
    msg = oracle.Payload()
    if seq is not None:
        msg.seq = seq
    msg.timestamp = 1_700_000_000_000
    for name, flag, ts in metrics:
        m = msg.metrics.add()
        m.name = name
        m.datatype = DataType.BOOLEAN
        m.boolean_value = flag
        if ts is not None:
            m.timestamp = ts
        # A field the agent does not read must be skipped, not trip the parser.
        m.metadata.content_type = "text/plain"
    got = decode(msg.SerializeToString())
    assert got.seq == seq and got.timestamp == 1_700_000_000_000
    assert [(m.name, m.value, m.timestamp) for m in got.metrics] == metrics


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_refused_cleanly(data: bytes) -> None:
    try:
        decode(data)
    except SparkplugDecodeError as exc:
        assert str(exc)


def test_hostile_shapes_are_named() -> None:
    good = oracle.Payload()
    m = good.metrics.add()
    m.name = REBIRTH
    m.datatype = DataType.BOOLEAN
    m.boolean_value = True
    raw = good.SerializeToString()
    for bad, where in ((raw[:-1], "payload"), (b"\x12\xff\xff\xff\xff\x0f", "past the end"),
                       (b"\x08" + b"\xff" * 11, "varint"), (b"\x0b", "wire type"),
                       (b"\x12\x03\x0a\x01\xff", "UTF-8"), (b"\x00", "field number 0"),
                       (b"\x12\x02\x20\xff", "truncated")):
        try:
            decode(bad)
        except SparkplugDecodeError as exc:
            assert where in str(exc), (bad, str(exc))
        else:
            raise AssertionError(f"{bad!r} was accepted")
    deep = b"\x12\x00" * 10_001
    try:
        decode(deep)
    except SparkplugDecodeError as exc:
        assert "more than" in str(exc)


def reading(sensor: str, quantity: str, value: float, quality: str = "good") -> Reading:
    return Reading(sensor=sensor, quantity=quantity, value=value, unit="degC",
                   ts_ns=1_700_000_000_123_456_789, mono_ns=1, quality=quality)


def test_births_data_and_death_as_the_protoc_decoder_sees_them() -> None:
    node = EdgeNode("plant", "gw-1", "1.0", bd_seq=254)
    will = oracle.parse(node.new_session())
    assert oracle.value(oracle.by_name(will)[BDSEQ]) == 255
    assert not will.HasField("seq")
    node.learn([reading("env", "temperature", 21.5)])
    nbirth, dbirth = node.births()
    assert nbirth.topic == "spBv1.0/plant/NBIRTH/gw-1"
    assert dbirth.topic == "spBv1.0/plant/DBIRTH/gw-1/env"
    nb = oracle.parse(nbirth.payload)
    assert nb.seq == 0
    metrics = oracle.by_name(nb)
    assert metrics[BDSEQ].datatype == DataType.INT64 and metrics[BDSEQ].long_value == 255
    assert metrics[REBIRTH].datatype == DataType.BOOLEAN and not metrics[REBIRTH].boolean_value
    db = oracle.parse(dbirth.payload)
    assert db.seq == 1
    t = oracle.by_name(db)["temperature"]
    assert t.datatype == DataType.DOUBLE and t.double_value == 21.5
    assert t.properties.keys[0] == "engUnit" and t.properties.values[0].string_value == "degC"
    seqs = []
    for i in range(300):
        out = node.data("env", [reading("env", "temperature", i, "suspect")], historical=False)
        p = oracle.parse(out.payload)
        seqs.append(p.seq)
        assert p.metrics[0].timestamp == 1_700_000_000_123
        assert p.metrics[0].properties.values[0].int_value == 64  # suspect
    assert seqs[:3] == [2, 3, 4] and seqs[253] == 255 and seqs[254] == 0
    assert all((b - a) % 256 == 1 for a, b in itertools.pairwise(seqs))
    death = oracle.parse(node.death().payload)
    assert oracle.value(oracle.by_name(death)[BDSEQ]) == 255
    assert oracle.value(oracle.parse(node.new_session()).metrics[0]) == 0  # bdSeq wraps too


def test_config_refuses_ids_that_break_topics(tmp_path: Path) -> None:
    base = make_config(tmp_path, 1883)
    for bad in ("a/b", "a+", "#", "", "x" * 65, "has space"):
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "sparkplug": {"enabled": True, "group_id": bad}})
        assert "sparkplug.group_id" in str(err.value.problems)
    with pytest.raises(ConfigError):
        parse_config({**base, "sparkplug": {"interval_s": 0}})
    cfg = parse_config({**base, "sparkplug": {"enabled": True, "group_id": "city-west"}})
    assert cfg.sparkplug.node_id == ""


def test_bd_seq_state_survives_restarts_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "sparkplug.bdseq"
    assert load_bd_seq(path) == 0
    save_bd_seq(path, 17)
    assert load_bd_seq(path) == 17
    for junk, want in ((b"\xff\xfe", 0), (b"nan\n", 0), (b"99999999999999999999999\n",
                                                         99999999999999999999999 % 256),
                       (b"-1\n", 255), (b"", 0)):
        path.write_bytes(junk)
        assert load_bd_seq(path) == want, junk
