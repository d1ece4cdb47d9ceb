"""Modbus decoding against pymodbus as the oracle, request planning, the PZEM profile against
the dedicated PZEM driver on the same emulator."""

from __future__ import annotations

import contextlib
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client.mixin import ModbusClientMixin

from agent.config.schema import SensorConfig
from drivers.base import BuildContext
from drivers.emulated.pzem004t import PzemLine
from drivers.modbus.decode import decode, encode, physical
from drivers.modbus.options import resolve
from drivers.modbus.plan import decode_request, plan
from drivers.modbus.profile import Point, resolve_points
from drivers.modbus.sensor import ModbusSensor
from drivers.registry import build_sensor
from drivers.serial.pzem004t import Measurement, PzemSensor

DT = ModbusClientMixin.DATATYPE
CASES = [("u16", DT.UINT16), ("i16", DT.INT16), ("u32", DT.UINT32), ("i32", DT.INT32),
         ("u64", DT.UINT64), ("i64", DT.INT64), ("f32", DT.FLOAT32), ("f64", DT.FLOAT64)]
words = st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4)


@pytest.mark.parametrize(("type_", "dt"), CASES)
@given(ws=words)
def test_decode_agrees_with_pymodbus_in_both_word_orders(type_: str, dt: object,
                                                         ws: list[int]) -> None:
    n = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "f32": 2}.get(type_, 4)
    for order, word_order in (("ABCD", "big"), ("CDAB", "little")):
        ours = decode(ws[:n], type_, order)
        theirs = ModbusClientMixin.convert_from_registers(ws[:n], dt,  # type: ignore[arg-type]
                                                          word_order=word_order)
        assert isinstance(theirs, (int, float))
        assert ours == theirs or (math.isnan(ours) and math.isnan(theirs))
        if not (isinstance(ours, float) and math.isnan(ours)):
            assert encode(ours, type_, order) == ws[:n]


def test_every_order_of_one_float() -> None:
    # 123.456 as f32 is 0x42F6E979: A=42 B=F6 C=E9 D=79.
    assert struct.pack(">f", 123.456).hex() == "42f6e979"
    wire = {"ABCD": [0x42F6, 0xE979], "CDAB": [0xE979, 0x42F6],
            "BADC": [0xF642, 0x79E9], "DCBA": [0x79E9, 0xF642]}
    for order, ws in wire.items():
        assert decode(ws, "f32", order) == pytest.approx(123.456, rel=1e-7)
        assert encode(decode(ws, "f32", order), "f32", order) == ws


def test_decimal_scales_round_like_the_datasheet() -> None:
    assert physical(2205, 0.1, 0, 1) == 220.5 == 2205 / 10
    assert physical(12345, 0.001, 0, 1) == 12.345 == 12345 / 1000
    assert physical(3, 1.0, -40.0, 1) == -37.0
    assert physical(1.5, 1.0, 0.0, 1000.0) == 1500.0  # kWh -> Wh


def test_bit_fields_share_a_register_and_signed_values_decode() -> None:
    spec = resolve({"points": [
        {"quantity": "door", "address": 7, "type": "u16", "bit": 0},
        {"quantity": "mode", "address": 7, "type": "u16", "bit": 4, "width": 3},
        {"quantity": "temperature", "address": 8, "type": "i16", "scale": 0.1, "unit": "degC"},
    ]})
    (req,) = plan(spec.points)
    assert (req.table, req.start, req.count) == ("holding", 7, 2)
    got = {p.quantity: v for p, v in decode_request(req, [0b0101_0001, 0xFF9C])}
    assert got == {"door": 1.0, "mode": 5.0, "temperature": -10.0}


def test_plan_coalesces_contiguous_points_within_the_limit() -> None:
    pts = [Point(quantity=f"q{i}", address=2 * i, type="f32") for i in range(100)]
    resolved, problems = resolve_points(pts, "input", "ABCD", 125, [p.quantity for p in pts])
    assert problems == []
    reqs = plan(resolved)
    assert [(r.start, r.count) for r in reqs] == [(0, 124), (124, 76)]
    assert [(r.start, r.count) for r in plan(resolved, 60)] == [(0, 60), (60, 60), (120, 60),
                                                                (180, 20)]
    gapped = resolve_points([pts[0], pts[3]], "input", "ABCD", 125, ["a", "b"])[0]
    assert len(plan(gapped)) == 2 and len(plan(gapped, max_gap=4)) == 1


MEASUREMENTS = [
    Measurement(220.0, 1.0, 220.0, 0.0, 50.0, 1.0, False),
    Measurement(231.4, 12.345, 2780.5, 123456.0, 49.9, 0.97, True),
    Measurement(0.0, 0.0, 0.0, 4294967.0, 45.0, 0.0, False),
    Measurement(259.9, 99.999, 22999.9, 9999999.0, 65.0, 0.51, True),
]


async def test_pzem_profile_reads_what_the_dedicated_driver_reads(ctx: BuildContext) -> None:
    line = PzemLine("pzem-both")
    meter = line.add_meter(5, "mixed")
    ctx.stack.push_async_callback(line.close)
    await line.start()
    dedicated = build_sensor(SensorConfig(name="pzem", driver="pzem004t", port=line.path,
                                          address=5, timeout_s=0.5), ctx)
    async with contextlib.AsyncExitStack() as other:
        ctx2 = BuildContext(ctx.clock, other)
        generic = build_sensor(SensorConfig(name="pzem", driver="modbus", port=line.path,
                                            address=5, timeout_s=0.5,
                                            options={"profile": "pzem-004t-v3"}), ctx2)
        assert isinstance(dedicated, PzemSensor) and isinstance(generic, ModbusSensor)
        for m in MEASUREMENTS:
            meter.override = m
            results = []
            for s in (dedicated, generic):  # one at a time: the port is opened exclusively
                await s.open()
                results.append({(r.quantity, r.unit): r.value for r in await s.sample()})
                await s.close()
            assert results[0] == results[1], m
            assert len(results[0]) == 7
        # And on the changing load, both read what the meter serves now.
        meter.override = None
        await generic.open()
        got = {r.quantity: r.value for r in await generic.sample()}
        await generic.close()
        assert 200 < got["voltage"] < 260 and 49 < got["frequency"] < 51
