"""The evaluation's targets on a reduced run, and its scoring rules on hand-made cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.anomaly import EVENT_TYPES, Thresholds
from models.anomaly_eval import (
    TARGET_F1,
    TARGET_FA_PER_30D,
    TARGET_P90_DELAY_MIN,
    SiteScore,
    Span,
    evaluate_site,
    main,
    score_cabinet,
    summary,
)
from models.anomaly_sim import SITES, Fault
from models.sites import HELDOUT

# The held-out preset is reported, never tuned on, so no test holds it to the targets.
DESIGN_SITES = sorted(n for n in SITES if n not in HELDOUT)

# A photocell stuck either way is only evident once the sun is past every elevation the
# site's photocell switched at (plus a cloud allowance): 20-35 min after the usual switching
# time at these latitudes (docs/anomalies.md). The other causes of the same types must meet
# the target.
SLOW_MECHANISM = "photocell"
PHOTOCELL_LIMIT_MIN = 40.0


def check_targets(s: dict[str, object], rate: bool = True) -> None:
    """``rate``: hold the false-alarm rate to the target; a 4-week run of one cabinet is too
    short to measure a rate of one a month, so there at most one false alarm is allowed, and
    with a handful of faults per type one stray event costs 0.1 of F1."""
    rows = s["types"]
    assert isinstance(rows, dict)
    if rate:
        assert float(s["false_alarms_per_30d"]) <= TARGET_FA_PER_30D  # type: ignore[arg-type]
        assert float(s["clean_false_alarms_per_30d"]) <= TARGET_FA_PER_30D  # type: ignore[arg-type]
    else:
        assert int(s["false_alarms"]) <= 1 and int(s["clean_events"]) <= 1  # type: ignore[call-overload]
    for t, r in rows.items():
        assert r["faults"] > 0, t
        assert r["f1"] >= (TARGET_F1 if rate else 0.8), (t, r)
        for m, d in r.get("p90_delay_min_by_mechanism", {"": {"p90_delay_min":
                                                               r["p90_delay_min"]}}).items():
            limit = PHOTOCELL_LIMIT_MIN if m == SLOW_MECHANISM else TARGET_P90_DELAY_MIN
            assert d["p90_delay_min"] <= limit, (t, m, d)


@pytest.mark.parametrize("name", DESIGN_SITES)
def test_targets_on_a_reduced_run(name: str) -> None:
    site = SITES[name]
    check_targets(summary(evaluate_site(site, weeks=4, cabinets=1)), rate=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", DESIGN_SITES)
def test_targets_on_the_full_run(name: str) -> None:
    check_targets(summary(evaluate_site(SITES[name], weeks=8, cabinets=3)))


def span(type_: str, a: float, b: float, detected: float | None = None) -> Span:
    return Span(type_, a, b, b if detected is None else detected, "main")


def test_scoring_rules() -> None:
    faults = [Fault("meter_stuck", 1000.0, 2000.0, "main", "frozen", "frozen"),
              Fault("lamps_dark", 5000.0, 9000.0, "lights", "breaker", "breaker")]
    events = [
        span("meter_stuck", 900.0, 2100.0, detected=1180.0),  # match, 3 min late
        span("meter_stuck", 1500.0, 1600.0, detected=1600.0),  # second match of one fault
        span("lamps_lit", 6000.0, 6100.0),  # wrong type during a fault: precision only
        span("unexplained_load", 20_000.0, 21_000.0),  # overlaps nothing: a false alarm
    ]
    score = SiteScore("x")
    score_cabinet(score, events, faults, 0.0, 30 * 86_400.0)
    out = summary(score)
    rows = out["types"]
    assert isinstance(rows, dict)
    assert rows["meter_stuck"]["precision"] == 1.0 and rows["meter_stuck"]["recall"] == 1.0
    assert rows["meter_stuck"]["p90_delay_min"] == pytest.approx(3.0)
    assert rows["lamps_dark"]["recall"] == 0.0 and rows["lamps_dark"]["f1"] == 0.0
    assert rows["lamps_lit"]["precision"] == 0.0
    assert out["false_alarms"] == 1
    normal_days = (30 * 86_400.0 - 5000.0) / 86_400.0
    assert out["false_alarms_per_30d"] == pytest.approx(30.0 / normal_days)
    assert out["meets_targets"] is False


def test_cli_json_and_thresholds(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["--site", "berlin-street", "--weeks", "1", "--cabinets", "1", "--no-clean", "--json",
               "--write-thresholds", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert out[0]["site"] == "berlin-street" and rc in (0, 1)
    assert set(out[0]["types"]) == set(EVENT_TYPES)
    th = Thresholds.from_json((tmp_path / "berlin-street.json").read_text())
    assert th.window_s == 60 and th.calibrated_days == 14.0
