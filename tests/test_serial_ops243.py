"""OPS243-A: report parsing across firmware dialects, fuzz, and the driver against its emulator."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.config.schema import SensorConfig
from agent.readings import Reading
from drivers.base import BuildContext, ConfigurationError, DeviceNotReady
from drivers.emulated.ops243 import Ops243Emulator, Pass, TrafficModel
from drivers.registry import build_sensor
from drivers.serial import ops243
from drivers.serial.ops243_reports import LineParser, Reply, SpeedReport
from tests.waiting import running, until


def parse_one(line: str, counts: dict[str, int] | None = None) -> Any:
    c = counts if counts is not None else {}
    items = LineParser(lambda k, n: c.__setitem__(k, c.get(k, 0) + n)).feed(line.encode() + b"\r\n")
    return items[0] if items else None


@pytest.mark.parametrize(
    ("line", "speeds"),
    [
        ("1.23", (1.23,)),
        ('"mps",-1.23', (-1.23,)),
        ('"mph",10', (4.4704,)),
        ("68 -1.5", (-1.5,)),
        ('{"speed":"-1.23"}', (-1.23,)),
        ('{"unit":"mps","magnitude":"68","speed":-1.23}', (-1.23,)),
        ('{"time":"812.3","Speed":[2.1,-0.9],"Magnitude":[60,31]}', (2.1, -0.9)),
        ('{"speed":"1.2","direction":"outbound"}', (-1.2,)),
        ('{"speed":"-1.2","direction":"inbound"}', (1.2,)),
        ('{"unit":"kmph","speed":"36"}', (10.0,)),
        ('{"Units":"mph","Speed":"-10"}', (-4.4704,)),
        ('\x00\xff#{"speed":"3.5"}', (3.5,)),  # noise merged in front of a report
    ],
)
def test_report_dialects(line: str, speeds: tuple[float, ...]) -> None:
    item = parse_one(line)
    assert isinstance(item, SpeedReport)
    assert item.speeds_mps == pytest.approx(speeds)


def test_magnitudes_time_and_replies() -> None:
    item = parse_one('{"time":"812.3","Speed":[2.1,-0.9],"Magnitude":[60,31]}')
    assert item.magnitudes == (60.0, 31.0) and item.device_time_s == 812.3
    reply = parse_one('{"Units":"m-per-sec"}')
    assert isinstance(reply, Reply) and reply.get("unit*") == "m-per-sec"


@pytest.mark.parametrize(
    ("line", "counter"),
    [
        ("hello", "bad_lines"),
        ("nan", "bad_lines"),
        ('{"speed":"fast"}', "bad_lines"),
        ('{"speed":1,"direction":"sideways"}', "bad_lines"),
        ('{"unit":"furlongs","speed":1}', "unknown_units"),
        ("1e400", "bad_lines"),  # too large for a float: not a number
        ('{"speed":"-412.5"}', "implausible"),
        ("{broken", "bad_lines"),
    ],
)
def test_junk_is_counted_and_dropped(line: str, counter: str) -> None:
    counts: dict[str, int] = {}
    assert parse_one(line, counts) is None
    assert counts == {counter: 1}


def test_overlong_line_is_bounded_and_the_next_report_survives() -> None:
    counts: dict[str, int] = {}
    parser = LineParser(lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n))
    assert parser.feed(b"x" * 2000) == []
    assert len(parser.buffer) <= parser.cap and counts["overlong_lines"] == 1
    (item,) = parser.feed(b'{"speed":"2.5"}\n')
    assert isinstance(item, SpeedReport) and item.speeds_mps == (2.5,)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=700), max_size=6))
def test_parser_survives_any_bytes_with_a_bounded_buffer(chunks: list[bytes]) -> None:
    parser = LineParser()
    for chunk in chunks:
        for item in parser.feed(chunk):
            assert isinstance(item, (SpeedReport, Reply))
        assert len(parser.buffer) <= parser.cap


_speed = st.decimals(min_value=-99, max_value=99, places=2, allow_nan=False).map(float)
_line = st.one_of(
    _speed.map(lambda v: ("json", f'{{"speed":"{v:.2f}"}}', v)),
    _speed.map(lambda v: ("json", f'{{"unit":"mps","magnitude":50,"speed":{v:.2f}}}', v)),
    _speed.map(lambda v: ("plain", f"{v:.2f}", v)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=600), _line), min_size=1, max_size=4),
       st.integers(1, 64))
def test_every_report_embedded_in_noise_is_found(
    parts: list[tuple[bytes, tuple[str, str, float]]], chunk: int
) -> None:
    stream = b""
    for noise, (kind, text, _) in parts:
        # A JSON object is found even glued to noise; a bare number needs its own line.
        stream += noise + (b"\n" if kind == "plain" else b"") + text.encode() + b"\r\n"
    parser = LineParser()
    found: list[float] = []
    for i in range(0, len(stream), chunk):
        for item in parser.feed(stream[i:i + chunk]):
            if isinstance(item, SpeedReport):
                found += item.speeds_mps
        assert len(parser.buffer) <= parser.cap
    it = iter(found)
    assert all(any(v == pytest.approx(want) for v in it) for _, (_, _, want) in parts)


# -- the driver against the emulated radar -----------------------------------------------




def radar(ctx: BuildContext, variant: str = "json", **options: Any) -> ops243.Ops243Sensor:
    opts: dict[str, Any] = {"gap_s": 0.25, "probe_s": 30.0, **options}
    opts["emulator"] = {"traffic": False, "variant": variant, "report_interval_s": 0.02}
    cfg = SensorConfig(name="radar", driver="ops243", port="emulated", timeout_s=0.3, options=opts)
    return build_sensor(cfg, ctx)





OVERLAP = [Pass(1, 12.0, 0.2), Pass(-1, 9.5, 0.2, start_s=0.1)]
# Longer passes when some of their first reports are to be spoiled by faults.
OVERLAP_LONG = [Pass(1, 12.0, 0.35), Pass(-1, 9.5, 0.35, start_s=0.15)]


def vehicles(out: list[Reading]) -> list[tuple[str, float]]:
    return sorted((r.quantity, r.value) for r in out)


async def test_open_configures_the_radar_and_checks_replies(ctx: BuildContext) -> None:
    s = radar(ctx, min_speed_mps=2, max_speed_mps=40, magnitude_min=30)
    emu: Ops243Emulator = s.emulator
    assert (emu.json, emu.units) == (False, "mph")  # factory settings
    await s.open()
    assert emu.commands_seen == ["OJ", "UM", "R>2", "R<40", "M>30"]
    assert (emu.json, emu.units, emu.min_speed, emu.max_speed, emu.magnitude_min) == (
        True, "mps", 2.0, 40.0, 30.0)
    await s.close()


async def test_unanswered_or_contradicted_configuration(ctx: BuildContext) -> None:
    s = radar(ctx)
    emu: Ops243Emulator = s.emulator
    emu.mute_replies = True
    with pytest.raises(DeviceNotReady, match=r"ops243-radar: no JSON reply to 'OJ' within 0.3 s"):
        await s.open()
    await s.close()
    emu.mute_replies = False
    emu.fixed_units = "mph"
    with pytest.raises(ConfigurationError, match=r"UM: radar reports units 'mph', not m/s"):
        await s.open()
    await s.close()


@pytest.mark.parametrize("variant", ["json", "json_list"])  # all dialects: parser tests
async def test_two_overlapping_vehicles_in_opposite_directions(
    ctx: BuildContext, variant: str
) -> None:
    s = radar(ctx, variant)
    await s.open()
    out: list[Reading] = []
    async with running(s, out):
        s.emulator.script(OVERLAP)
        await until(lambda: len(out) >= 2, 15.0)
        await until(lambda: s.detector.next_deadline() is None, 15.0)
    assert vehicles(out) == [("speed_in", 12.0), ("speed_out", 9.5)]
    assert {r.unit for r in out} == {"m/s"}
    assert s.counters == {"vehicles_in": 1, "vehicles_out": 1}
    await s.close()


@pytest.mark.parametrize(
    ("fault", "counters"),
    [("garbage", ("bad_lines", "garbage_prefix")), ("corrupt", ("bad_lines", "garbage_prefix")),
     ("truncate", ("bad_lines", "garbage_prefix"))],
)
async def test_line_faults_are_counted_and_vehicles_still_exact(
    ctx: BuildContext, fault: str, counters: tuple[str, ...]
) -> None:
    s = radar(ctx)
    await s.open()
    out: list[Reading] = []
    async with running(s, out):
        s.emulator.inject(fault, 3)
        s.emulator.script(OVERLAP_LONG)
        await until(lambda: len(out) >= 2, 15.0)
        await until(lambda: s.detector.next_deadline() is None, 15.0)
    assert vehicles(out) == [("speed_in", 12.0), ("speed_out", 9.5)]
    assert sum(s.counters.get(c, 0) for c in counters) >= 1
    await s.close()


async def test_silent_radar_fails_its_probe_and_a_live_one_passes(ctx: BuildContext) -> None:
    s = radar(ctx, probe_s=0.2)
    emu: Ops243Emulator = s.emulator
    await s.open()
    out: list[Reading] = []
    async with running(s, out) as task:
        await until(lambda: emu.commands_seen.count("U?") >= 2, 15.0)
        assert not task.done()  # answered probes keep it running
        emu.faults.silent = True
        with pytest.raises(DeviceNotReady, match=r"radar silent: no reply to 'U\?' within 0.3 s"):
            await asyncio.wait_for(task, 2.0)
    await s.close()


async def test_restarted_radar_is_reconfigured(ctx: BuildContext) -> None:
    s = radar(ctx, probe_s=0.2)
    emu: Ops243Emulator = s.emulator
    await s.open()
    out: list[Reading] = []
    emu.restart()  # power cut: plain output, mph
    with pytest.raises(DeviceNotReady, match="restarted"):
        await asyncio.wait_for(s.run(out.append), 2.0)  # found by the probe (road is empty)
    await s.close()
    await s.open()
    emu.restart()
    emu.script([Pass(1, 10.0, 0.3)])  # found by the first plain report
    with pytest.raises(DeviceNotReady, match="no longer JSON"):
        await asyncio.wait_for(s.run(out.append), 2.0)
    assert out == []
    await s.close()
    await s.open()
    assert (emu.json, emu.units) == (True, "mps")


async def test_slow_radar_and_unplug_replug(ctx: BuildContext) -> None:
    s = radar(ctx)
    emu: Ops243Emulator = s.emulator
    emu.faults.dribble_s = 0.001  # replies arrive a byte at a time
    await s.open()
    emu.faults.dribble_s = 0.0
    emu.faults.delay_s = 0.5  # slower than timeout_s
    with pytest.raises(DeviceNotReady, match="no JSON reply"):
        await s.open()
    emu.faults.delay_s = 0.0
    await s.close()
    emu.unplug()
    with pytest.raises(DeviceNotReady, match="cannot open"):
        await s.open()
    emu.replug()
    await s.open()
    out: list[Reading] = []
    async with running(s, out) as task:
        emu.script([Pass(-1, 8.0, 0.3)])
        await until(lambda: len(out) == 1, 15.0)
        emu.unplug()
        with pytest.raises(DeviceNotReady, match="disconnected"):
            await asyncio.wait_for(task, 2.0)
    assert vehicles(out) == [("speed_out", 8.0)]
    await s.close()


async def test_generated_traffic_is_counted() -> None:
    day = 1_750_032_000.0 - 1_750_032_000.0 % 86400
    t13 = day + 13 * 3600
    emu = Ops243Emulator(time_fn=lambda: t13, traffic=True, traffic_scale=8.0, range_m=8.0,
                         seed=28)
    # Same seed, same draws: the first car comes within 0.2 s, free-flowing, lasting < 1 s.
    probe = TrafficModel(28, 8.0, 8.0)
    assert probe.next_gap_s(t13) < 0.2 and probe.vehicle(t13).duration_s < 1.0
    assert not emu.model.congested(t13)
    async with contextlib.AsyncExitStack() as stack:
        ctx = BuildContext(SystemClock(), stack, {})
        stack.push_async_callback(emu.close)
        cfg = SensorConfig(name="road", driver="ops243", port=emu.path, timeout_s=0.5,
                           options={"gap_s": 0.3})
        s = build_sensor(cfg, ctx)
        await emu.start()
        await s.open()
        out: list[Reading] = []
        async with running(s, out):
            await until(lambda: len(out) >= 1, 8.0)
        await s.close()
    assert emu.passes_started >= 1
    assert all(5.0 < r.value <= 25.5 for r in out)
    assert {r.quantity for r in out} <= {"speed_in", "speed_out"}


def test_bad_options_are_configuration_errors() -> None:
    stack = contextlib.AsyncExitStack()
    c = BuildContext(SystemClock(), stack)
    cfg = SensorConfig(name="r", driver="ops243", port="/dev/null",
                       options={"min_speed_mps": 50, "max_speed_mps": 10})
    with pytest.raises(ConfigurationError, match="sensor r: speed window"):
        build_sensor(cfg, c)


async def test_unknown_emulator_variant_is_a_configuration_error(ctx: BuildContext) -> None:
    cfg = SensorConfig(name="r", driver="ops243", port="emulated",
                       options={"emulator": {"variant": "xml"}})
    with pytest.raises(ConfigurationError, match="sensor r emulator: unknown report variant 'xml'"):
        build_sensor(cfg, ctx)


@pytest.mark.parametrize(
    ("line", "counter"),
    [
        ('{"speed":' + "9" * 400 + "}", "bad_lines"),  # too large for a float
        ('{"speed":1e999}', "bad_lines"),
        ('{"speed":NaN}', "bad_lines"),
        ('{"speed":-Infinity}', "bad_lines"),
        ('{"speed":2.5,"magnitude":NaN}', "bad_lines"),
        ('{"speed":2.5,"magnitude":"NaN"}', "bad_lines"),  # must not skip the floor
        ('{"speed":2.5,"magnitude":1e999}', "bad_lines"),
        ('{"speed":[[[[[[[[[[[[[[[[[[[[2.5]]]]]]]]]]]]]]]]]]]]}', "bad_lines"),
        ('{"speed":2.5,"x":' + "[" * 200 + "]" * 200 + "}", "bad_lines"),
        ('{"speed":"2\xff5"}', "non_ascii"),
    ],
)
def test_hostile_json_is_dropped_and_counted_never_raised(line: str, counter: str) -> None:
    counts: dict[str, int] = {}
    parser = LineParser(lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n))
    assert parser.feed(line.encode("latin-1") + b"\n") == []
    assert counts.get(counter, 0) >= 1


def test_deep_nesting_and_long_lines_in_one_chunk_are_dropped() -> None:
    counts: dict[str, int] = {}
    parser = LineParser(lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n))
    deep = b"{" + b'"a":[' * 10_000 + b"\n"
    items = parser.feed(deep + b'{"speed":"2.5"}\n')
    assert [i.speeds_mps for i in items if isinstance(i, SpeedReport)] == [(2.5,)]
    assert counts["overlong_lines"] == 1
