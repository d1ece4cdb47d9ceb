"""The feed's unit vocabulary, derived values and model outputs as docs/mqtt.md states them, held
to what the drivers, profiles, pipeline and shipped models really emit; and the rounding rule."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config.cleaning import DEFAULTS
from agent.feed import messages as feed
from agent.feed.numbers import COUNTER_UNITS, DERIVED_UNITS, SIGNIFICANT_DIGITS, rounded
from agent.pipeline.derived import ENERGY_NAMES, TRAFFIC_NAMES
from agent.pipeline.filters import UNIT_CONVERSIONS
from agent.readings import UNITS, ChannelStats, Inference, Reading, Window
from drivers.modbus.profile import SHIPPED_DIR, load_profile_file
from drivers.modbus.units import UNIT_MAP
from models.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "mqtt.md").read_text(encoding="utf-8")
T0 = 1_790_000_000_000_000_000


def doc_table(heading: str) -> list[list[str]]:
    """The rows of the first table under ``## heading`` (cells without backticks)."""
    section = DOC.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) > 2, f"no table under {heading}"
    return [[c.strip().strip("`") for c in r.strip("|").split("|")] for r in rows[2:]]


def literal_units() -> list[tuple[str, str | None, str]]:
    """(place, quantity or None, unit) of every reading a driver builds with literal strings:
    ``self.reading(quantity, value, unit)`` and ``Reading(sensor, quantity, value, unit, ...)``."""
    found = []
    files = [p for pkg in ("drivers", "firmware_bridge") for p in (ROOT / pkg).rglob("*.py")
             if "emulated" not in p.parts]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                node.func, "id", "")
            at = {"reading": (0, 2), "Reading": (1, 3)}.get(name)
            if at is None or len(node.args) <= at[1]:
                continue
            q, u = node.args[at[0]], node.args[at[1]]
            if isinstance(u, ast.Constant) and isinstance(u.value, str):
                quantity = q.value if isinstance(q, ast.Constant) else None
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", quantity, u.value))
    return found


def test_the_documented_vocabulary_is_the_agents() -> None:
    documented = [row[0] for row in doc_table("Units")]
    assert sorted(documented) == sorted(UNITS), "docs/mqtt.md Units and agent.readings.UNITS"


def test_every_unit_a_driver_emits_is_in_the_vocabulary() -> None:
    found = literal_units()
    assert len(found) >= 20, found  # the scan sees the drivers (bme280, pzem004t, pms5003, ...)
    for place, quantity, unit in found:
        assert unit in UNITS, f"{place}: {unit!r} is not in the feed's unit vocabulary"
        if quantity in DEFAULTS:
            assert DEFAULTS[quantity].unit == unit, f"{place}: {quantity} in {unit!r}"


def test_every_profile_quantity_and_conversion_lands_in_the_vocabulary() -> None:
    profiles = sorted(SHIPPED_DIR.glob("*.toml"))
    assert profiles
    for path in profiles:
        for p in load_profile_file(path).points:
            assert p.unit in UNITS, f"{path.name}: {p.quantity} in {p.unit!r}"
            if p.quantity in DEFAULTS:
                assert DEFAULTS[p.quantity].unit == p.unit, f"{path.name}: {p.quantity}"
    assert {canonical for canonical, _ in UNIT_MAP.values()} <= UNITS
    assert {canonical for canonical, _, _ in UNIT_CONVERSIONS.values()} <= UNITS
    assert {d.unit for d in DEFAULTS.values()} <= UNITS


def test_derived_values_are_documented_with_their_units() -> None:
    assert set(DERIVED_UNITS) == set(TRAFFIC_NAMES) | set(ENERGY_NAMES)
    rows = {row[0]: row[1] for row in doc_table("Derived values")}
    assert rows == dict(DERIVED_UNITS)
    assert set(rows.values()) <= UNITS


def test_shipped_model_outputs_are_documented_with_their_units() -> None:
    rows = {(r[0], r[1]): r[2] for r in _shipped_rows()}
    manifests = sorted((ROOT / "models").glob("*.json"))
    assert manifests
    for path in manifests:
        m = load_manifest(path)
        for out in m.outputs:
            assert rows.get((m.name, out.name)) == out.unit, (m.name, out.name)
            assert out.unit in UNITS
    generic = {r[0] for r in doc_table("Model outputs")}
    assert {"anomaly_score", "anomaly", "inputs_filled", "<output>_model"} <= generic


def _shipped_rows() -> list[list[str]]:
    section = DOC.split("\n## Model outputs\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("The shipped models:", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]
    return [[c.strip().strip("`") for c in r.strip("|").split("|")] for r in rows]


# -- rounding ---------------------------------------------------------------------------------

def test_float_noise_is_rounded_and_counters_stay_exact() -> None:
    assert rounded(230.56666666666666, "V") == 230.5667
    assert rounded(21.433333333333334, "degC") == 21.43333
    assert rounded(101325.12345, "Pa") == 101325.1
    assert rounded(1.2345678e-5, "V") == 1.234568e-05  # a shunt voltage keeps its digits
    assert rounded(123_456_789.0125, "Wh") == 123_456_789.013  # an energy counter: to the mWh
    assert rounded(123_456_789.0125, "W") == 123_456_800.0
    assert rounded(0.0) == 0.0 and rounded(-0.0) == 0.0
    assert rounded(math.nan) is None and rounded(math.inf, "Wh") is None
    assert rounded(1.7976931348623157e308) == 1.797693e308  # near the edge: no overflow


@given(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(sorted(UNITS)))
def test_rounding_keeps_the_significant_digits(value: float, unit: str) -> None:
    out = rounded(value, unit)
    assert out is not None and math.isfinite(out)
    if value != 0.0 and abs(value) > 1e-300:
        assert abs(out - value) <= abs(value) * 0.5 * 10.0 ** (1 - SIGNIFICANT_DIGITS) * 1.000001
    if unit in COUNTER_UNITS:
        assert abs(out - value) <= 0.0005 + abs(value) * 1e-15
    # Short on the wire: no more significant digits than the rule allows.
    mantissa = re.sub(r"e.*$", "", repr(abs(out))).replace(".", "").lstrip("0").rstrip("0")
    if unit not in COUNTER_UNITS or abs(value) < 1e4:
        assert len(mantissa) <= SIGNIFICANT_DIGITS, (value, out)


def test_every_float_a_builder_sends_is_rounded() -> None:
    noisy = 230.56666666666666
    stats = ChannelStats(3, noisy, noisy, noisy, noisy, noisy / 7, "V")
    w = Window("s", T0, T0 + 10**10, {"pzem.voltage": stats}, fused={"v": stats},
               derived={"power_mean_w": noisy, "energy_wh": 123_456_789.0125})
    body = json.loads(feed.encode(feed.window_message("g", w).seal(seq=1, boot_id="b",
                                                                   ts_ns=T0)))
    assert body["channels"]["pzem.voltage"]["mean"] == 230.5667
    assert body["channels"]["pzem.voltage"]["std"] == 32.93810
    assert body["fused"]["v"]["max"] == 230.5667
    assert body["derived"] == {"power_mean_w": 230.5667, "energy_wh": 123_456_789.013}
    r = Reading("pzem", "energy", 123_456_789.0125, "Wh", T0, 0)
    body = json.loads(feed.encode(feed.reading_message("g", "s", r).seal(seq=2, boot_id="b",
                                                                         ts_ns=T0)))
    assert body["value"] == 123_456_789.013
    inf = Inference("m", "v", T0, {"power_next_w": noisy, "label": "ok"}, 0.123456789,
                    skill=0.0333333333333)
    body = json.loads(feed.encode(feed.inference_message("g", inf).seal(seq=3, boot_id="b",
                                                                        ts_ns=T0)))
    assert body["outputs"] == {"power_next_w": 230.5667, "label": "ok"}
    assert (body["latency_ms"], body["skill"]) == (0.1234568, 0.03333333)
    snap = {"sensors": [{"name": "pzem", "last_values": {
        "voltage": {"value": noisy, "unit": "V", "quality": "good"},
        "energy": {"value": 123_456_789.0125, "unit": "Wh", "quality": "good"}}}]}
    body = json.loads(feed.encode(feed.health_message("g", snap).seal(seq=4, boot_id="b",
                                                                      ts_ns=T0)))
    last = body["health"]["sensors"][0]["last_values"]
    assert (last["voltage"]["value"], last["energy"]["value"]) == (230.5667, 123_456_789.013)
    event = {"event_id": "e", "type": "meter_spike", "stream": "s", "channel": "main",
             "start": "2026-01-01T00:00:00Z", "detected": "2026-01-01T00:01:00Z",
             "end": None, "severity": "info", "evidence": {"value_w": noisy, "mode": "x"}}
    body = json.loads(feed.encode(feed.anomaly_message("g", event).seal(seq=5, boot_id="b",
                                                                        ts_ns=T0)))
    assert body["evidence"] == {"value_w": 230.5667, "mode": "x"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_null(value: float) -> None:
    r = Reading("s", "temperature", value, "degC", T0, 0)
    body = json.loads(feed.encode(feed.reading_message("g", "s", r).seal(seq=1, boot_id="b",
                                                                         ts_ns=T0)))
    assert body["value"] is None
