"""The simulated site (traffic-flow physics, load shapes), the site CSV and the dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.csvdata import SiteDataError, read_csv, write_csv
from models.dataset import ENERGY_INPUTS, TRAFFIC_INPUTS, build, quantities, split_of
from models.simulate import SiteParams, local_calendar, simulate_site
from models.sites import BERLIN_STREET
from models.sun import solar_position

VF_M_S = BERLIN_STREET.road.free_flow_m_s
KJ_VEH_KM = BERLIN_STREET.road.jam_density_veh_km
LUMINAIRES, LUMINAIRE_W = BERLIN_STREET.cabinet.luminaires, BERLIN_STREET.cabinet.luminaire_w


@pytest.fixture(scope="module")
def site():  # type: ignore[no-untyped-def]
    return simulate_site(SiteParams(days=42, start="2025-06-02"))


def test_fundamental_diagram_speed_falls_with_density(site) -> None:  # type: ignore[no-untyped-def]
    occ = site.col("occupancy")
    slower = np.minimum(site.truth["true_speed_in"], site.truth["true_speed_out"])
    ok = np.isfinite(occ)
    assert slower[ok & (occ < 0.05)].mean() > 0.85 * VF_M_S
    # Mean occupancy of the two loops above 0.47 puts one direction past kj / 2 (0.42): the
    # congested branch, where speed is below half the free-flow speed.
    high = slower[ok & (occ > 0.47)]
    assert len(high) and high.max() < 0.5 * VF_M_S
    # Density never passes jam density: occupancy <= kj * 6.5 m (+ sensor noise).
    assert np.nanmax(occ) <= KJ_VEH_KM * 6.5 / 1000 + 0.05


def test_weekday_peaks_and_quiet_nights(site) -> None:  # type: ignore[no-untyped-def]
    hour, dow, _ = local_calendar(site.ts_s, site.timezone)
    flow_in = site.col("vehicles_in") * 12
    am = np.nanmean(flow_in[(dow < 5) & (hour >= 7) & (hour < 9)])
    night = np.nanmean(flow_in[(hour >= 2) & (hour < 4)])
    sunday_am = np.nanmean(flow_in[(dow == 6) & (hour >= 7) & (hour < 9)])
    assert am > 10 * night and am > 2 * sunday_am


def test_lights_follow_the_sun_and_chargers_draw_kilowatts(site) -> None:  # type: ignore[no-untyped-def]
    elevation, _ = solar_position(site.ts_s + 150, 52.5, 13.4)
    power = site.truth["true_power_w"]
    hour, _, _ = local_calendar(site.ts_s, site.timezone)
    dark = (elevation < -6) & (hour >= 21) & (hour < 23)
    noon = (elevation > 30) & (hour >= 11) & (hour < 13)
    # Evening minimum sits above the lighting load; the midday minimum is cabinet base load.
    assert np.min(power[dark]) > 0.8 * LUMINAIRES * LUMINAIRE_W
    assert np.min(power[noon]) < 150
    assert 7_000 < np.percentile(power, 99.5) < 19_000


def test_csv_round_trip_and_errors(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "site.csv"
    write_csv(site, path)
    back = read_csv(path, tz=site.timezone)
    assert np.array_equal(back.ts_s, site.ts_s)
    for name, col in site.columns.items():
        assert np.allclose(back.columns[name], col, rtol=1e-5, equal_nan=True), name
    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], lines[1].replace(",", ",x", 1)]) + "\n")
    with pytest.raises(SiteDataError, match=r"bad.csv:2: column vehicles_in: 'x\S*' is not a"):
        read_csv(bad)
    bad.write_text("ts,vehicles,temperature\n0,1,2\n")
    with pytest.raises(SiteDataError, match=r"bad.csv:1: unknown column\(s\) \['vehicles'\]"):
        read_csv(bad)
    bad.write_text("ts,temperature\n2025-01-01T00:01:00+00:00,2\n2025-01-01T00:05:00+00:00,2\n")
    with pytest.raises(SiteDataError, match=r"bad.csv:2: .* not aligned to 300 s windows"):
        read_csv(bad)
    bad.write_text("ts,temperature\n2025-01-01T00:00:00,2\n")
    with pytest.raises(SiteDataError, match="has no UTC offset"):
        read_csv(bad)


def test_missing_rows_become_missing_windows(tmp_path: Path) -> None:
    path = tmp_path / "gap.csv"
    path.write_text("ts,power_mean_w\n0,100\n300,110\n1200,90\n")
    data = read_csv(path)
    assert data.ts_s.tolist() == [0, 300, 600, 900, 1200]
    assert np.isnan(data.col("power_mean_w")[2:4]).all()


def test_dataset_rows_and_split(site) -> None:  # type: ignore[no-untyped-def]
    traffic = build("traffic", site)
    energy = build("energy", site)
    assert traffic.x.shape[1] == len(TRAFFIC_INPUTS) and energy.x.shape[1] == len(ENERGY_INPUTS)
    assert np.isfinite(traffic.x).all() and np.isfinite(energy.x).all()
    assert set(np.unique(split_of(site.ts_s))) == {0, 1, 2}
    # The target is the next window's measured quantity.
    q = quantities(site)
    i = int(np.flatnonzero(np.isfinite(q["speed_mean"][1:]))[100])
    row = int(np.flatnonzero(traffic.ts_s == site.ts_s[i])[0])
    assert traffic.y[row] == pytest.approx(q["speed_mean"][i + 1])
    assert traffic.persistence[row] == pytest.approx(traffic.x[row, TRAFFIC_INPUTS.index(
        "speed_mean")])
