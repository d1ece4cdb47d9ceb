"""Site presets: they differ as described, and every one is deterministic from its seed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.csvdata import SiteData, read_csv
from models.dataset import quantities
from models.simulate import SiteParams, local_calendar, main, simulate_site
from models.sites import HELDOUT, PRESETS, UnknownPreset, preset
from models.sun import solar_position

DAYS = 28
START = "2025-06-02"  # a Monday; four weeks of early summer


def _site(name: str, seed: int = 7) -> SiteData:
    return simulate_site(preset(name, days=DAYS, start=START, seed=seed))


@pytest.fixture(scope="module")
def sites() -> dict[str, SiteData]:
    return {name: _site(name) for name in PRESETS}


def _free_flow(data: SiteData, lanes: int) -> float:
    """Median measured speed of windows with light traffic per lane."""
    q = quantities(data)
    light = (q["flow_veh_h"] > 0) & (q["flow_veh_h"] < 300 * lanes)
    return float(np.nanmedian(q["speed_mean"][light]))


def test_presets_are_named_and_training_site_is_the_default() -> None:
    assert set(PRESETS) >= {"berlin-street", "chicago-arterial", "seville-suburb", "heldout-ring"}
    assert PRESETS["berlin-street"] == SiteParams()
    assert all(p.name == name for name, p in PRESETS.items())
    assert HELDOUT == ("heldout-ring",) and "HELD OUT" in PRESETS["heldout-ring"].about
    with pytest.raises(UnknownPreset, match="unknown site preset 'nowhere'"):
        preset("nowhere")


def test_same_seed_same_data_other_seed_other_data() -> None:
    for name in PRESETS:
        a, b, c = _site(name), _site(name), _site(name, seed=8)
        for col in a.columns:
            assert np.array_equal(a.columns[col], b.columns[col], equal_nan=True), (name, col)
        assert not np.array_equal(a.columns["power_mean_w"], c.columns["power_mean_w"],
                                  equal_nan=True), name


def test_arterial_is_faster_busier_elsewhere_and_has_more_chargers(
    sites: dict[str, SiteData],
) -> None:
    berlin, art = sites["berlin-street"], sites["chicago-arterial"]
    p = PRESETS["chicago-arterial"]
    assert p.road.free_flow_m_s * 3.6 == pytest.approx(60, abs=0.5) and p.road.lanes == 2
    # The shipped traffic model never forecast above 14.4 m/s; this street's free flow does.
    assert _free_flow(art, 2) > 15.0 > 14.4 > _free_flow(berlin, 1)
    assert np.nanmean(quantities(art)["flow_veh_h"]) > 1.8 * np.nanmean(
        quantities(berlin)["flow_veh_h"])
    assert art.timezone == "America/Chicago" != berlin.timezone
    # Four points draw more at once than the training site's two could (11 + 7.4 kW).
    assert len(p.cabinet.chargers_kw) == 4
    assert np.nanmax(art.truth["true_power_w"]) > 19_000


def test_morning_peak_is_in_local_time(sites: dict[str, SiteData]) -> None:
    for name in ("berlin-street", "chicago-arterial"):
        data = sites[name]
        hour, dow, _ = local_calendar(data.ts_s, data.timezone)
        flow = quantities(data)["flow_veh_h"]
        am = np.nanmean(flow[(dow < 5) & (hour >= 7) & (hour < 9)])
        night = np.nanmean(flow[(dow < 5) & (hour >= 2) & (hour < 4)])
        assert am > 8 * night, name


def test_suburb_is_slow_quiet_and_lit(sites: dict[str, SiteData]) -> None:
    berlin, sub = sites["berlin-street"], sites["seville-suburb"]
    p = PRESETS["seville-suburb"]
    assert p.lat_deg == pytest.approx(37.4, abs=0.1) and p.road.free_flow_m_s < 11.5
    assert _free_flow(sub, 1) < 11.5
    assert np.nanmean(quantities(sub)["flow_veh_h"]) < 0.7 * np.nanmean(
        quantities(berlin)["flow_veh_h"])
    assert np.nanmean(sub.columns["temperature"]) > np.nanmean(berlin.columns["temperature"]) + 5
    # Dark evenings (before the 23:00 dimming): 40 luminaires of 35 W plus the cabinet.
    hour, _, _ = local_calendar(sub.ts_s, sub.timezone)
    elevation, _ = solar_position(sub.ts_s + 150, p.lat_deg, p.lon_deg)
    evening = (elevation < -6) & (hour >= 21) & (hour < 23)
    lights_w = p.cabinet.luminaires * p.cabinet.luminaire_w
    assert evening.sum() > 100
    assert np.median(sub.truth["true_power_w"][evening]) > 0.9 * lights_w


def test_heldout_preset_simulates(sites: dict[str, SiteData]) -> None:
    data = sites["heldout-ring"]
    assert data.timezone == PRESETS["heldout-ring"].timezone
    assert np.isfinite(quantities(data)["speed_mean"]).mean() > 0.5


def test_cli_writes_a_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "site.csv"
    assert main(["--preset", "chicago-arterial", "--days", "2", "--out", str(out)]) == 0
    assert "chicago-arterial" in capsys.readouterr().out
    back = read_csv(out, tz="America/Chicago")
    want = simulate_site(replace(PRESETS["chicago-arterial"], days=2))
    assert np.array_equal(back.ts_s, want.ts_s)
    assert np.allclose(back.columns["vehicles_in"], want.columns["vehicles_in"], equal_nan=True)
    assert main(["--preset", "nowhere", "--out", str(out)]) == 2
