"""Wall-clock windows: alignment, partition, aggregates, late readings, bounds, routing."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.schema import FuseGroup, SensorConfig, StreamConfig
from agent.pipeline.windows import Windower
from agent.readings import Reading, Window

S = 10**9
T0 = 1_800_000_000 * S  # a multiple of every window length used here


def sensors(*names: str) -> list[SensorConfig]:
    return [SensorConfig(name=n, driver="synthetic") for n in names]


def r(sensor: str, value: float, ts: int, quantity: str = "temperature", unit: str = "degC",
      quality: str = "good", reasons: tuple[str, ...] = ()) -> Reading:
    return Reading(sensor, quantity, value, unit, ts, ts - T0, quality, reasons)  # type: ignore[arg-type]


def test_windows_align_to_the_wall_clock_and_close_after_grace() -> None:
    w = Windower([StreamConfig(name="env", sensors=["a"], window_s=10)], sensors("a"))
    w.add(r("a", 1.0, T0 + 3 * S))
    w.add(r("a", 3.0, T0 + 9 * S))
    w.add(r("a", 5.0, T0 + 12 * S))
    assert w.close_due(T0 + 10 * S, 2 * S) == []  # end + grace not reached
    (first,) = w.close_due(T0 + 12 * S, 2 * S)
    assert (first.stream, first.start_ns, first.end_ns) == ("env", T0, T0 + 10 * S)
    assert first.channels["a.temperature"].count == 2
    assert first.channels["a.temperature"].mean == 2.0
    assert first.flags == ()
    (rest,) = w.flush()
    assert rest.start_ns == T0 + 10 * S
    assert rest.flags == ("partial",)


def test_aggregates_use_good_readings_and_count_the_others() -> None:
    w = Windower([StreamConfig(name="env", sensors=["a"], window_s=10)], sensors("a"), hold_s=0)
    for i, v in enumerate([1.0, 2.0, 4.0]):
        w.add(r("a", v, T0 + i * S))
    w.add(r("a", 99.0, T0 + 5 * S, quality="suspect", reasons=("spike",)))
    w.add(r("a", 500.0, T0 + 6 * S, quality="bad", reasons=("out_of_range",)))
    # Suspect only for its timestamp: the value is fine, the window carries the doubt.
    w.add(r("a", 3.0, T0 + 7 * S, quality="suspect", reasons=("clock_unsynced",)))
    (win,) = w.flush()
    cs = win.channels["a.temperature"]
    assert (cs.count, cs.suspect, cs.bad) == (4, 1, 1)
    assert (cs.min, cs.max, cs.last, cs.unit) == (1.0, 4.0, 3.0, "degC")
    assert cs.mean == pytest.approx(2.5)
    assert cs.std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0, 3.0]))
    assert win.flags == ("clock_unsynced", "partial")


def test_a_channel_with_only_flagged_readings_has_counts_and_nan_aggregates() -> None:
    w = Windower([StreamConfig(name="env", sensors=["a"])], sensors("a"))
    w.add(r("a", 500.0, T0, quality="bad", reasons=("out_of_range",)))
    (win,) = w.flush()
    cs = win.channels["a.temperature"]
    assert (cs.count, cs.bad) == (0, 1)
    assert math.isnan(cs.mean) and math.isnan(cs.std)


def test_late_readings_are_counted_and_dropped() -> None:
    w = Windower([StreamConfig(name="env", sensors=["a"], window_s=10)], sensors("a"))
    w.add(r("a", 1.0, T0 + S))
    (closed,) = w.close_due(T0 + 11 * S, 0)
    w.add(r("a", 2.0, T0 + 5 * S))  # belongs to the closed window
    w.add(r("a", 3.0, T0 + 15 * S))
    assert w.late("env") == 1
    (nxt,) = w.flush()
    assert closed.channels["a.temperature"].count == 1
    assert nxt.channels["a.temperature"].count == 1
    assert nxt.channels["a.temperature"].mean == 3.0


def test_open_windows_are_capped_per_stream() -> None:
    w = Windower([StreamConfig(name="env", sensors=["a"], window_s=1)], sensors("a"), max_open=3)
    for i in range(10):
        w.add(r("a", float(i), T0 + i * S))
    assert w.stats()["open"] == {"env": 3}
    early = w.close_due(T0, 0)  # nothing is due yet, but the windows closed early are returned
    assert [x.start_ns for x in early] == [T0 + i * S for i in range(7)]
    assert all(x.flags == ("partial",) for x in early)
    w.add(r("a", -1.0, T0 + S // 2))  # older than everything still open
    assert w.late("env") == 1


def test_routing_to_every_stream_and_raw_streams() -> None:
    streams = [StreamConfig(name="env", sensors=["a", "b"], window_s=10),
               StreamConfig(name="fast", sensors=["a"], window_s=1, share="raw")]
    w = Windower(streams, sensors("a", "b", "c"))
    assert w.raw_streams_for("a") == ["fast"]
    assert w.raw_streams_for("b") == []
    w.add(r("a", 1.0, T0 + S // 2))
    w.add(r("b", 2.0, T0 + S // 2))
    w.add(r("c", 3.0, T0 + S // 2))  # configured but in no stream
    out = w.flush()
    assert [(x.stream, sorted(x.channels)) for x in out] == [
        ("fast", ["a.temperature"]), ("env", ["a.temperature", "b.temperature"])]
    assert w.stats()["unrouted"] == 1


def test_bad_stream_configuration_is_reported_with_where() -> None:
    with pytest.raises(ValueError, match="stream 'env': no sensor named 'x'"):
        Windower([StreamConfig(name="env", sensors=["x"])], sensors("a"))
    group = FuseGroup(name="t", channels=["a.temperature", "b.temperature"])
    with pytest.raises(ValueError, match=r"fuse group 't': 'b\.temperature' names sensor 'b'"):
        Windower([StreamConfig(name="env", sensors=["a"], fuse=[group])], sensors("a", "b"))
    mixed = FuseGroup(name="t", channels=["a.temperature", "b.humidity"])
    with pytest.raises(ValueError, match="mixes quantities humidity, temperature"):
        Windower([StreamConfig(name="env", sensors=["a", "b"], fuse=[mixed])], sensors("a", "b"))
    nodot = FuseGroup(name="t", channels=["a", "b.temperature"])
    with pytest.raises(ValueError, match="'a' is not a channel name"):
        Windower([StreamConfig(name="env", sensors=["a", "b"], fuse=[nodot])], sensors("a", "b"))


# -- properties ---------------------------------------------------------------------------------

readings_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 120 * S),
              st.floats(-1e4, 1e4), st.sampled_from(["good", "good", "good", "suspect", "bad"])),
    max_size=200)


def _naive(items: list[tuple[str, int, float, str]], start: int, end: int,
           sensor: str) -> tuple[int, list[float], int, int]:
    inside = [(t, v, q) for s, t, v, q in items if s == sensor and start <= T0 + t < end]
    good = [(t, v) for t, v, q in inside if q == "good"]
    good.sort(key=lambda p: p[0])
    return (len(good), [v for _, v in good], sum(q == "suspect" for *_, q in inside),
            sum(q == "bad" for *_, q in inside))


@settings(max_examples=200, deadline=None)
@given(readings_strategy, st.sampled_from([1.0, 2.5, 10.0, 60.0]), st.integers(0, 3))
def test_windows_partition_time_and_aggregates_match_a_naive_recomputation(
        items: list[tuple[str, int, float, str]], window_s: float, closes: int) -> None:
    items.sort(key=lambda x: x[1])  # time order, as acquisition produces it
    w = Windower([StreamConfig(name="s", sensors=["a", "b"], window_s=window_s)],
                 sensors("a", "b"), max_open=1000)
    out: list[Window] = []
    # Close on the way, at times that never make a reading late.
    step = max(1, len(items) // (closes + 1))
    for i, (s, t, v, q) in enumerate(items):
        w.add(r(s, v, T0 + t, quality=q, reasons=() if q == "good" else ("x",)))
        if closes and i % step == step - 1:
            out += w.close_due(T0 + t, 0)
    out += w.flush()
    assert w.late("s") == 0
    window_ns = round(window_s * S)
    starts = [x.start_ns for x in out]
    assert starts == sorted(set(starts))  # no window twice, in order
    for x in out:
        assert x.start_ns % window_ns == 0
        assert x.end_ns - x.start_ns == window_ns
    total = 0
    for x in out:
        for name, cs in x.channels.items():
            sensor = name.split(".")[0]
            n, values, suspect, bad = _naive(items, x.start_ns, x.end_ns, sensor)
            assert (cs.count, cs.suspect, cs.bad) == (n, suspect, bad)
            total += cs.count + cs.suspect + cs.bad
            if n:
                assert cs.mean == pytest.approx(statistics.fmean(values), rel=1e-9, abs=1e-7)
                assert (cs.min, cs.max) == (min(values), max(values))
                assert cs.last == values[-1]
                expected_std = statistics.stdev(values) if n > 1 else 0.0
                assert cs.std == pytest.approx(expected_std, rel=1e-6, abs=1e-6)
    assert total == len(items)  # every reading is in exactly one window, none lost


awkward = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1e308, -1e308, 5e-324]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), awkward), max_size=40))
def test_windows_and_fusion_never_raise_on_nan_inf_or_huge_values(
        items: list[tuple[str, float]]) -> None:
    group = FuseGroup(name="x", channels=["a.level", "b.level", "c.level"])
    w = Windower([StreamConfig(name="s", sensors=["a", "b", "c"], fuse=[group])],
                 sensors("a", "b", "c"))
    for i, (s, v) in enumerate(items):
        w.add(r(s, v, T0 + i * S // 10, quantity="level", unit="m"))
        w.add(r(s, v, T0 + i * S // 10, quantity="active_power", unit="W"))
    out = w.flush()
    assert sum(cs.count for x in out for cs in x.channels.values()) == 2 * len(items)
