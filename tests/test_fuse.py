"""Inverse-variance fusion of redundant sensors and the consistency check."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.cleaning import CleanOptions
from agent.config.schema import FuseGroup, SensorConfig, StreamConfig
from agent.pipeline.fuse import Member, fuse
from agent.pipeline.windows import Windower
from agent.readings import ChannelStats, Reading

S = 10**9
T0 = 1_800_000_000 * S


def stats(mean: float, std: float, count: int, *, suspect: int = 0, bad: int = 0) -> ChannelStats:
    return ChannelStats(count, mean, mean - std, mean + std, mean, std, "degC", suspect, bad)


def test_weights_are_inverse_variances_of_the_channel_means() -> None:
    members = [Member("a.t", 0.0), Member("b.t", 0.0)]
    # Variances of the means: 1/4 and 4/4 -> weights 4 and 1.
    out = fuse("t", members, {"a.t": stats(10.0, 1.0, 4), "b.t": stats(12.0, 2.0, 4)})
    assert out.stats.mean == pytest.approx((4 * 10.0 + 1 * 12.0) / 5)
    assert out.stats.std == pytest.approx(math.sqrt(1 / 5))
    assert out.stats.count == 8
    assert (out.stats.min, out.stats.max) == (9.0, 14.0)
    assert out.flags == ()


def test_the_floor_stops_many_readings_from_looking_precise() -> None:
    members = [Member("a.t", 0.5), Member("b.t", 0.5)]
    # a has 1000 readings of tiny spread, b only 2: without a floor a would take it all.
    out = fuse("t", members, {"a.t": stats(20.0, 0.01, 1000), "b.t": stats(20.4, 0.01, 2)})
    assert out.stats.mean == pytest.approx(20.2)
    assert out.stats.std == pytest.approx(0.5 / math.sqrt(2))


def test_a_sensor_that_disagrees_with_the_rest_is_flagged_and_left_out() -> None:
    members = [Member(c, 0.5) for c in ("a.t", "b.t", "c.t", "d.t")]
    chans = {"a.t": stats(20.0, 0.1, 10), "b.t": stats(20.3, 0.1, 10),
             "c.t": stats(19.8, 0.1, 10), "d.t": stats(27.0, 0.1, 10, suspect=2)}
    out = fuse("t", members, chans)
    assert out.excluded == ("d.t",)
    assert out.flags == ("inconsistent:d.t",)
    assert out.stats.mean == pytest.approx((20.0 + 20.3 + 19.8) / 3)
    assert out.stats.count == 30
    assert out.stats.suspect == 2  # the members' counts still add up


def test_two_sensors_that_disagree_flag_the_group() -> None:
    members = [Member("a.t", 0.5), Member("b.t", 0.5)]
    out = fuse("t", members, {"a.t": stats(20.0, 0.1, 10), "b.t": stats(30.0, 0.1, 10)})
    assert out.flags == ("disagreement:t",)
    assert out.excluded == ()
    assert out.stats.mean == pytest.approx(25.0)


def test_members_without_good_readings_are_skipped() -> None:
    members = [Member("a.t", 0.5), Member("b.t", 0.5)]
    empty = ChannelStats(0, math.nan, math.nan, math.nan, math.nan, math.nan, "degC", 0, 3)
    out = fuse("t", members, {"a.t": stats(20.0, 0.1, 10), "b.t": empty})
    assert out.stats.mean == 20.0
    assert out.stats.bad == 3
    none = fuse("t", members, {"b.t": empty})
    assert none.stats.count == 0 and math.isnan(none.stats.mean)


finite = st.floats(-1e6, 1e6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(finite, st.floats(0, 1e3), st.integers(1, 100), st.floats(0, 10)),
                min_size=1, max_size=6))
def test_fused_estimate_lies_within_the_inputs(
        chans: list[tuple[float, float, int, float]]) -> None:
    members = [Member(f"s{i}.t", floor) for i, (_, _, _, floor) in enumerate(chans)]
    data = {f"s{i}.t": stats(m, sd, n) for i, (m, sd, n, _) in enumerate(chans)}
    out = fuse("t", members, data)
    means = [m for m, *_ in chans]
    assert min(means) <= out.stats.mean <= max(means)
    assert out.stats.std >= 0.0


def test_the_inconsistent_flag_is_visible_in_the_window() -> None:
    names = ["a", "b", "c"]
    cfgs = [SensorConfig(name=n, driver="synthetic",
                         clean={"temperature": CleanOptions(fuse_sigma=0.3)}) for n in names]
    group = FuseGroup(name="temperature", channels=[f"{n}.temperature" for n in names])
    w = Windower([StreamConfig(name="env", sensors=names, window_s=10, fuse=[group])], cfgs)
    for i in range(10):
        for n, level in (("a", 20.0), ("b", 20.2), ("c", 24.0)):
            v = level + 0.05 * (i % 3)
            w.add(Reading(n, "temperature", v, "degC", T0 + i * S, i * S))
    (win,) = w.close_due(T0 + 10 * S, 0)
    assert "inconsistent:c.temperature" in win.flags
    fused = win.fused["temperature"]
    assert fused.count == 20
    assert fused.mean == pytest.approx(20.145, abs=1e-9)  # a 20.045, b 20.245
    assert win.channels["c.temperature"].count == 10  # the channel itself is still reported
