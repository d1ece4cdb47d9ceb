"""Calibration from simulated history: deterministic, per site, quiet on normal operation."""

from __future__ import annotations

import numpy as np
import pytest

from agent.anomaly import AnomalyMonitor
from agent.anomaly.calibrate import History, calibrate
from agent.anomaly.robust import student_t_quantile, tail_limit
from agent.anomaly.solar import solar_elevation_deg
from models.anomaly_sim import FOREIGN_SITES, TRAINING_SITE, CabinetSite, simulate_cabinet
from models.sun import solar_position


@pytest.fixture(scope="module", params=[TRAINING_SITE, *FOREIGN_SITES], ids=lambda s: s.name)
def site(request: pytest.FixtureRequest) -> CabinetSite:
    site: CabinetSite = request.param
    return site


def test_calibration_is_deterministic_and_serialisable(site: CabinetSite) -> None:
    a = calibrate(simulate_cabinet(site, 14).history(14))
    b = calibrate(simulate_cabinet(site, 14).history(14))
    assert a.to_json() == b.to_json()
    assert type(a).from_json(a.to_json()) == a


def test_history_from_samples_matches_arrays() -> None:
    run = simulate_cabinet(TRAINING_SITE, 2)
    h = History.from_samples(run.samples())
    assert h.window_s == 60 and len(h) == len(run)
    np.testing.assert_array_equal(h.chargers_w, run.chargers_w)
    assert calibrate(h).to_json() == calibrate(run.history(2)).to_json()


def test_thresholds_follow_the_site(site: CabinetSite) -> None:
    th = calibrate(simulate_cabinet(site, 14).history(14))
    full = site.luminaires * site.luminaire_w * 1.04
    prof = np.array(th.lamps.profile_w)
    # The learned lit profile carries the dimming schedule, or its absence.
    assert prof.min() == pytest.approx(full * site.dim_level, rel=0.15)
    assert prof.max() == pytest.approx(full, rel=0.15)
    # The residual limit sits above the cabinet's own load (base, standby, heater) and well
    # below the smallest unexplained load the simulation injects (400 W on top of it).
    own = site.base_w + 8 * len(site.chargers_kw)
    assert own < min(th.unexplained.limit_w) < own + site.heater_w + site.fan_w + 400.0
    assert len(th.unexplained.main_gains) == 1 + len(site.chargers_kw)
    assert th.drift.rel < 0.02  # below the 2 % at which a drift is labelled a fault
    assert -6.0 < th.lamps.el_on_deg < -2.0 < th.lamps.el_off_deg < 4.0


def test_no_event_on_a_clean_month(site: CabinetSite) -> None:
    run = simulate_cabinet(site, 14 + 28, with_faults=False, seed=site.seed + 1)
    mon = AnomalyMonitor("energy", calibrate(run.history(14)))
    events = [ev for s in run.samples(14) for ev in mon.update(s)]
    assert events == []


def test_faults_stay_out_of_the_calibration_period() -> None:
    run = simulate_cabinet(TRAINING_SITE, 28)
    t14 = float(run.ts_s[0]) + 14 * 86_400
    assert run.faults and min(f.start_s for f in run.faults) >= t14
    clean = simulate_cabinet(TRAINING_SITE, 28, with_faults=False)
    n14 = 14 * 1440
    np.testing.assert_array_equal(run.main_w[:n14], clean.main_w[:n14])


def test_tail_limit_extrapolates_beyond_the_sample() -> None:
    x = np.random.default_rng(3).exponential(1.0, 20_000)
    # 20 000 draws a month, target once a month: about ln(20 000) ~ 9.9 for a unit exponential.
    assert tail_limit(x, 20_000.0, 1.0) == pytest.approx(np.log(20_000.0), rel=0.1)
    assert tail_limit(x, 20_000.0, 0.1) > tail_limit(x, 20_000.0, 1.0) >= x.max() - 1e-12


def test_student_t_quantile() -> None:
    assert student_t_quantile(0.975, 10) == pytest.approx(2.228, abs=0.01)
    assert student_t_quantile(0.995, 30) == pytest.approx(2.750, abs=0.01)


def test_runtime_sun_matches_the_simulation() -> None:
    ts = np.arange(1_735_689_600, 1_735_689_600 + 366 * 86_400, 7_777.0)
    for lat, lon in ((52.5, 13.4), (41.9, -87.6)):
        el, _ = solar_position(ts, lat, lon)
        mine = np.array([solar_elevation_deg(float(t), lat, lon) for t in ts])
        np.testing.assert_allclose(mine, el, atol=1e-9)


@pytest.mark.parametrize("seed", [7, 1007])
def test_faults_in_the_history_barely_move_the_thresholds(seed: int) -> None:
    site = TRAINING_SITE
    declared = site.heater_w + site.fan_w
    clean = calibrate(simulate_cabinet(site, 14, seed=seed, split_days=14).history(14),
                      declared_w=declared)
    run = simulate_cabinet(site, 14, fault_free_days=0.0, seed=seed, split_days=14)
    assert {f.type for f in run.faults} >= {"meter_stuck", "meter_spike", "lamps_dark",
                                            "lamps_lit", "unexplained_load"}
    dirty = calibrate(run.history(14), declared_w=declared)
    assert dirty.stuck.frozen_windows <= clean.stuck.frozen_windows + 1
    assert dirty.spike.rel <= clean.spike.rel + 0.1
    assert dirty.drift.rel < 0.02  # still below a labelled drift
    assert dirty.lamps.dark_ratio == pytest.approx(clean.lamps.dark_ratio, abs=0.05)
    assert dirty.lamps.lit_w == pytest.approx(clean.lamps.lit_w, rel=0.1)
    assert abs(dirty.lamps.el_on_deg - clean.lamps.el_on_deg) < 0.5
    # Well below own load + the smallest injected unexplained load (400 W).
    assert max(dirty.unexplained.limit_w) < max(clean.unexplained.limit_w) + 60.0
