"""Per-site thresholds from a history of normal operation (e.g. the first 14 days).

Each detector reduces the history to the statistic it alarms on, already made persistent the
way the detector makes it (a run of ``confirm`` windows must all exceed), and the threshold is
set where that statistic would be exceeded at the target rate. Two weeks cannot show a
once-a-month tail directly, so the tail beyond the 99th percentile is fitted with an
exponential (peaks over threshold, mean excess) and extrapolated; the threshold is never below
the largest value the history actually reached. The target rate is shared equally between the
eight detector instances (stuck and spike run once per feed meter).

Floors keep a threshold from sitting inside a detector's resolution on a very quiet history;
they are physical (a tenth of the lighting load, a 50 W load, half a percent between meters).

Faults in the history: nobody can promise two fault-free weeks, so each statistic is cleaned
before its tail is fitted. A day whose largest value lies beyond ``TRIM_Z`` robust standard
deviations of the days' largest values (median and MAD of the daily maxima) holds an episode
no normal day produces; its values above that cut are dropped (``trim_episodes``). Levels
learned by hour keep only what at least three days showed (a one-off load is not the cabinet's
own), switching elevations far from the rest are dropped, and a frozen meter's exact repeats
do not count as chance repeats. A fault larger than normal by less than that margin can still
raise its threshold: the margin is what keeps a rough but normal day in the history.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from agent.anomaly.robust import (
    equal_probability,
    fill_circular,
    run_min,
    student_t_quantile,
    tail_limit,
    trim_episodes,
)
from agent.anomaly.sample import Sample
from agent.anomaly.thresholds import (
    NO_DAWN_BOUND,
    DriftThresholds,
    LampThresholds,
    SpikeThresholds,
    StuckThresholds,
    Thresholds,
    UnexplainedThresholds,
)

F = NDArray[np.float64]
DETECTORS = 8
CONFIRM = 3
CLEAR = 3
LAMP_BINS = 48
LOAD_BINS = 24
DRIFT_SPAN = 15
EL_MARGIN_DEG = 0.3
# Photocells switch on earlier and off later under heavy cloud; two weeks rarely show the
# darkest twilight, so "the sun is clearly up" allows for it on top of what was seen.
CLOUD_ALLOWANCE_DEG = 1.5
GAIN_NOISE_W = 20.0
NOISE_Z = 3.0
GAIN_PRIOR = 0.005  # meters of accuracy class 1 rarely differ by more than half a percent
SEEN_DAYS = 3
EL_OUTLIER_Z = 5.0


@dataclass(frozen=True)
class History:
    """The same channels as ``Sample``, as arrays over consecutive windows."""

    window_s: int
    main_w: F
    check_w: F
    lights_w: F
    chargers_w: F  # (windows, charge points)
    photocell: F
    elevation_deg: F
    local_hour: F

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> History:
        s0 = samples[0]
        k = len(s0.chargers_w)

        def col(name: str) -> F:
            return np.array([getattr(s, name) for s in samples], dtype=float)

        chargers = np.array([s.chargers_w for s in samples], dtype=float).reshape(-1, k)
        return cls(round((s0.end_ns - s0.start_ns) / 1e9), col("main_w"), col("check_w"),
                   col("lights_w"), chargers, col("photocell"), col("elevation_deg"),
                   col("local_hour"))

    def __len__(self) -> int:
        return len(self.main_w)

    @property
    def days(self) -> float:
        return len(self) * self.window_s / 86_400.0


def _per_30d(h: History, count: int) -> float:
    return count / max(h.days, 1e-9) * 30.0


def _per_day(h: History) -> int:
    return max(round(86_400 / h.window_s), 1)


def robust_limit(h: History, x: F, budget: float, min_spread: float,
                 count: int | None = None) -> float:
    """``tail_limit`` of the statistic ``x`` (one value per window) after ``trim_episodes``."""
    x = trim_episodes(x, _per_day(h), min_spread)
    n = int(np.isfinite(x).sum()) if count is None else count
    return tail_limit(x, _per_30d(h, n), budget)


def _stuck(h: History, budget: float) -> StuckThresholds:
    per30 = 30 * 86_400 / h.window_s
    p = max(equal_probability(h.main_w), equal_probability(h.check_w))
    # A frozen run of L windows is L - 1 equal pairs in a row; choose L so that runs that long
    # turn up ``budget`` times a month by chance on either meter.
    need = math.log(budget / 2 / per30) / math.log(p)
    frozen = int(min(max(math.ceil(need) + 1, 3), 60))
    feed = np.concatenate([h.main_w, h.check_w])
    feed = feed[np.isfinite(feed) & (feed != 0.0)]  # a meter reading exactly 0 W is the fault
    # A cabinet's own electronics draw tens of watts: a feed meter far below what it ever read
    # is not measuring.
    zero = float(np.clip(0.25 * np.quantile(feed, 0.0005), 1.0, 30.0)) if len(feed) else 1.0
    return StuckThresholds(frozen_windows=frozen, zero_w=zero, clear_windows=CLEAR)


def excursions(x: F, floor_w: float) -> F:
    """``meters.excursion`` over every interior window of ``x`` (NaN at the edges)."""
    prev, cur, nxt = x[:-2], x[1:-1], x[2:]
    lo, hi = np.minimum(prev, nxt), np.maximum(prev, nxt)
    out = np.where(cur > hi, cur - hi, np.where(cur < lo, lo - cur, 0.0)) / (hi + floor_w)
    return np.concatenate([[np.nan], out, [np.nan]])


def _spike(h: History, budget: float) -> SpikeThresholds:
    feed = h.main_w[np.isfinite(h.main_w)]
    floor = float(max(np.quantile(feed, 0.05), 10.0)) if len(feed) else 50.0
    stats = []
    for x, ref in ((h.main_w, h.check_w), (h.main_w, h.check_w)[::-1]):
        ex = excursions(x, floor)
        ref_ex = np.nan_to_num(excursions(ref, floor), nan=0.0)
        # Only windows the reference meter did not echo are candidates for a meter glitch.
        stats.append(np.where(ref_ex < 0.5 * np.nan_to_num(ex), ex, np.nan))
    s = np.concatenate([trim_episodes(x, _per_day(h), 0.02) for x in stats])
    rel = tail_limit(s, _per_30d(h, int(np.isfinite(s).sum()) // 2), budget)
    rel = float(min(max(rel, 0.15), 0.9))
    return SpikeThresholds(rel=rel, floor_w=floor, ref_rel=0.5 * rel)


def _drift(h: History, budget: float) -> DriftThresholds:
    check = h.check_w
    ok = meter_alive(h.main_w) & meter_alive(check)  # a dead meter's ratio is not drift
    low = float(np.quantile(check[ok], 0.05)) if ok.any() else 0.0
    min_load = max(20.0, 0.3 * low)
    ok &= check >= min_load
    r = (h.main_w[ok] - check[ok]) / check[ok]
    if len(r) < DRIFT_SPAN * 10:
        return DriftThresholds(0.0, 0.03, 0.018, DRIFT_SPAN, min_load, 5)
    bias = float(np.median(r))
    med = np.median(np.lib.stride_tricks.sliding_window_view(r, DRIFT_SPAN), axis=1)
    dev = run_min(np.abs(med - bias), 2)
    rel = float(max(robust_limit(h, dev, budget, 0.001, len(dev)), 0.005))
    return DriftThresholds(bias=bias, rel=rel, clear_rel=0.6 * rel, span_windows=DRIFT_SPAN,
                           min_load_w=min_load, clear_windows=5)


def _switch_elevations(h: History) -> F:
    p = h.photocell
    on = p >= 0.5
    edge = np.zeros(len(p), dtype=bool)
    edge[1:] = (on[1:] != on[:-1]) & np.isfinite(p[1:]) & np.isfinite(p[:-1])
    edge |= (p > 0.0) & (p < 1.0)
    return h.elevation_deg[edge]


def dusk_dawn_pairs(h: History, el_off: float) -> F:
    """Per night, the elevation where the photocell switched off at dawn minus where it
    switched on at dusk (the windows where it crossed 0.5, as ``LampDetector`` sees them)."""
    p = h.photocell
    on = p >= 0.5
    ok = np.isfinite(p[1:]) & np.isfinite(p[:-1])
    rise = np.flatnonzero(ok & on[1:] & ~on[:-1]) + 1
    fall = np.flatnonzero(ok & ~on[1:] & on[:-1]) + 1
    memory = round(20 * 3600 / h.window_s)
    out = []
    for i in rise:
        if h.elevation_deg[i] >= el_off:
            continue
        j = fall[np.searchsorted(fall, i):][:1]
        if len(j) and j[0] - i <= memory:
            out.append(h.elevation_deg[j[0]] - h.elevation_deg[i])
    return np.asarray(out, dtype=float)


def dawn_margin(h: History, el_off: float, budget: float) -> float:
    """How far above this night's dusk switching elevation the dawn switch may come.

    Bounded like the site-wide band (a prediction interval, one exceedance per ``budget``
    per 30 dawns), never below what the history showed or the cloud allowance (a dry dusk
    and an overcast dawn). Where dusk and dawn are unrelated the bound is wide and the
    site-wide ``el_off`` is the tighter one.
    """
    d = dusk_dawn_pairs(h, el_off)
    if len(d) < 6:
        return NO_DAWN_BOUND
    centre = float(np.median(d))
    d = d[np.abs(d - centre) <= EL_OUTLIER_Z * max(1.4826 * float(np.median(np.abs(d - centre))),
                                                    0.5)]
    if len(d) < 6:
        return NO_DAWN_BOUND
    t = student_t_quantile(1.0 - min(budget / 30.0, 0.25), len(d) - 1)
    sd = max(float(np.std(d, ddof=1)), 0.3) * math.sqrt(1.0 + 1.0 / len(d))
    return max(float(np.mean(d)) + t * sd, float(d.max()) + EL_MARGIN_DEG,
               CLOUD_ALLOWANCE_DEG + EL_MARGIN_DEG)


def _expected(h: History, el_on: float, el_off: float) -> tuple[F, NDArray[np.bool_]]:
    """Vectorised ``loads.expected_lit`` plus the settled mask (same state as the window before)."""
    p = h.photocell
    e = h.elevation_deg
    state = np.where(np.isnan(p) | ((p > 0) & (p < 1)), np.nan, (p >= 0.5).astype(float))
    state = np.where(e < el_on, 1.0, np.where(e > el_off, 0.0, state))
    settled = np.zeros(len(p), dtype=bool)
    settled[1:] = np.isfinite(state[1:]) & (state[1:] == state[:-1])
    return state, settled & np.isfinite(h.lights_w)


def _lamps(h: History, budget: float) -> LampThresholds:
    el_sw = _switch_elevations(h)
    if len(el_sw) >= 6:
        # A photocell failing part way through a night switches at an elevation far from the
        # rest: that is the fault, not the photocell's range.
        centre = float(np.median(el_sw))
        mad = max(1.4826 * float(np.median(np.abs(el_sw - centre))), 0.3)
        el_sw = el_sw[np.abs(el_sw - centre) <= EL_OUTLIER_Z * mad]
    if len(el_sw) >= 6:
        # A prediction interval for next month's switching elevations from a dozen nights
        # (a night's dusk and dawn share a photocell mood, so nights are the sample size); an
        # exceedance is an alarm, and there are 30 of each twilight in 30 days.
        nights = max(len(el_sw) // 2, 3)
        t = student_t_quantile(1.0 - min(budget / 30.0, 0.25), nights - 1)
        mid = float(np.mean(el_sw))
        sd = max(float(np.std(el_sw, ddof=1)), 0.3) * math.sqrt(1.0 + 1.0 / nights)
        el_on = min(mid - t * sd, float(el_sw.min()) - EL_MARGIN_DEG)
        el_off = max(mid + t * sd, float(el_sw.max()) + EL_MARGIN_DEG) + CLOUD_ALLOWANCE_DEG
    else:
        el_on, el_off = -6.0, 6.0
    state, settled = _expected(h, el_on, el_off)
    lit = settled & (state == 1.0)
    dark = settled & (state == 0.0)
    bins = (h.local_hour * LAMP_BINS / 24.0).astype(int) % LAMP_BINS
    prof = np.full(LAMP_BINS, np.nan)
    for b in range(LAMP_BINS):
        sel = lit & (bins == b)
        if sel.sum() >= 5:
            prof[b] = float(np.median(h.lights_w[sel]))
    prof = fill_circular(prof)
    with np.errstate(divide="ignore", invalid="ignore"):
        shortfall = np.where(lit, 1.0 - h.lights_w / prof[bins], np.nan)
    # A run that stays short for CONFIRM windows; windows of the other state break the run.
    short = run_min(np.where(lit, shortfall, -np.inf), CONFIRM)
    short[~np.isfinite(short)] = np.nan
    lim = robust_limit(h, short, budget, 0.02)
    dark_ratio = float(min(max(1.0 - lim, 0.5), 0.85))
    day = run_min(np.where(dark, h.lights_w, -np.inf), CONFIRM)
    day[~np.isfinite(day)] = np.nan
    top = float(prof.max()) if len(prof) else 0.0
    lit_w = float(max(robust_limit(h, day, budget, 0.01 * top + 1.0), 0.0) + 0.1 * top)
    return LampThresholds(profile_w=[float(v) for v in prof], dark_ratio=dark_ratio, lit_w=lit_w,
                          el_on_deg=el_on, el_off_deg=el_off,
                          dawn_margin_deg=dawn_margin(h, el_off, budget),
                          confirm_windows=CONFIRM, clear_windows=CLEAR)


def circuits(h: History) -> F:
    """(windows, 1 + charge points): the lighting circuit, then each charge point."""
    return np.column_stack([h.lights_w, h.chargers_w])


def meter_alive(x: F) -> NDArray[np.bool_]:
    """Windows where a feed meter plausibly measured: not exactly 0 W, not an exact repeat."""
    same = np.zeros(len(x), dtype=bool)
    same[1:] = x[1:] == x[:-1]
    out: NDArray[np.bool_] = np.isfinite(x) & (x != 0.0) & ~same
    return out


def circuit_gains(h: History, feed: F) -> list[float]:
    """How the feed meter reads each circuit meter's watt, by ridge regression towards 1.

    The ridge keeps a circuit that hardly drew anything in the history at gain 1 instead of
    fitting noise; with a few days of load its data outweighs the prior. Windows of a dead or
    frozen meter are left out, and the fit is repeated without the windows it explains worst
    (a load nobody metered, a drifting meter), so faults in the history do not bend it.
    """
    x = circuits(h)
    ok = meter_alive(feed) & np.all(np.isfinite(x), axis=1)
    x, y = x[ok], feed[ok]
    if len(y) < 100:
        return [1.0] * x.shape[1]
    y = y - x.sum(axis=1)  # deviations from gain 1 are what is fitted
    keep = np.ones(len(y), dtype=bool)
    d = np.zeros(x.shape[1])
    ridge = (GAIN_NOISE_W / GAIN_PRIOR) ** 2
    for _ in range(3):
        xk, yk = x[keep], y[keep]
        xc, yc = xk - xk.mean(axis=0), yk - yk.mean()
        d = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
        res = y - x @ d
        med = float(np.median(res[keep]))
        spread = max(1.4826 * float(np.median(np.abs(res[keep] - med))), 1.0)
        keep = np.abs(res - med) <= 5.0 * spread + 0.01 * np.abs(x).sum(axis=1)
        if keep.sum() < 100:
            break
    return [float(1.0 + v) for v in np.clip(d, -0.1, 0.1)]


def residuals(h: History, main_gains: list[float], check_gains: list[float]) -> F:
    """``loads.residual`` on both feed meters, the smaller of the two (NaN-aware)."""
    x = circuits(h)
    rm = np.where(meter_alive(h.main_w), h.main_w - x @ np.asarray(main_gains), np.nan)
    rc = np.where(meter_alive(h.check_w), h.check_w - x @ np.asarray(check_gains), np.nan)
    out: F = np.where(np.isnan(rm), rc, np.where(np.isnan(rc), rm, np.minimum(rm, rc)))
    return out


def noise_slope(r: F, metered: F) -> float:
    """Residual noise (1 sigma) per W of metered load, from window-to-window changes.

    Changes of the residual are meter noise on top of the rare real step (a thermostat), so
    their robust spread, by decile of metered load, grows with the load at this slope.
    """
    d = np.abs(np.diff(r)) / math.sqrt(2.0)
    m = np.maximum(metered[1:], metered[:-1])
    ok = np.isfinite(d) & np.isfinite(m)
    d, m = d[ok], m[ok]
    if len(d) < 1000:
        return 0.0
    edges = np.unique(np.quantile(m, np.linspace(0, 1, 11)))
    xs, ys = [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (m >= lo) & (m <= hi)
        if sel.sum() >= 50:
            xs.append(float(np.median(m[sel])))
            ys.append(1.4826 * float(np.median(d[sel])))
    if len(xs) < 2 or np.ptp(xs) <= 0:
        return 0.0
    slope = float(np.polyfit(xs, ys, 1)[0])
    return max(slope, 0.0)


def seen_on_days(r: F, bins: F, per_day: int, n_bins: int) -> F:
    """Per bin, the ``SEEN_DAYS``-th highest daily 99th percentile of ``r``: a level that one or
    two days alone reached (unexplained loads in the history) is not the cabinet's own."""
    day = np.arange(len(r)) // per_day
    prof = np.full(n_bins, np.nan)
    for b in range(n_bins):
        sel = np.isfinite(r) & (bins == b)
        levels = [float(np.quantile(r[sel & (day == d)], 0.99))
                  for d in np.unique(day[sel]) if np.count_nonzero(sel & (day == d)) >= 20]
        if levels:
            prof[b] = sorted(levels)[-min(SEEN_DAYS, len(levels))]
    return prof


def _unexplained(h: History, budget: float, declared_w: float = 0.0) -> UnexplainedThresholds:
    gm, gc = circuit_gains(h, h.main_w), circuit_gains(h, h.check_w)
    metered = h.lights_w + h.chargers_w.sum(axis=1)
    # Three confirming windows all beyond NOISE_Z sigma: rare by chance even at the loads the
    # history never reached (the whole charging capacity at once).
    allowance = NOISE_Z * noise_slope(residuals(h, gm, gc), metered)
    r = residuals(h, gm, gc) - allowance * metered
    bins = h.local_hour.astype(int) % LOAD_BINS
    prof = fill_circular(seen_on_days(r, bins, _per_day(h), LOAD_BINS))
    # Thermostat loads (heater, fan) do not keep to the clock: let each hour borrow the highest
    # level seen within two hours of it.
    wide = np.array([prof[[(b + d) % LOAD_BINS for d in range(-2, 3)]].max()
                     for b in range(LOAD_BINS)])
    # The margin is the noise around the levels the history showed (charging included); a
    # declared load adds a level, and the same noise rides on it.
    excess = run_min(r - wide[bins], CONFIRM)
    margin = robust_limit(h, excess, budget, 10.0)
    margin = float(max(margin, 50.0))
    if declared_w > 0:
        # Thermostat loads the history may never have seen running (a heater in a mild
        # fortnight): on top of the quietest level, the cabinet may draw their nameplate.
        wide = np.maximum(wide, float(np.nanquantile(r, 0.01)) + declared_w)
    return UnexplainedThresholds(limit_w=[float(v) + margin for v in wide], main_gains=gm,
                                 check_gains=gc, load_allowance=allowance,
                                 confirm_windows=CONFIRM, clear_windows=CLEAR)


def calibrate(h: History, target_false_alarms_per_30d: float = 1.0,
              declared_w: float = 0.0) -> Thresholds:
    """Thresholds for this site; deterministic (no randomness) for a given history.

    ``declared_w``: the nameplate power of the cabinet's thermostat loads (heater, fan), which
    may switch on after the history ends; 0 trusts the history alone.
    """
    budget = target_false_alarms_per_30d / DETECTORS
    return Thresholds(
        stuck=_stuck(h, budget),
        spike=_spike(h, budget),
        drift=_drift(h, budget),
        lamps=_lamps(h, budget),
        unexplained=_unexplained(h, budget, declared_w),
        window_s=int(h.window_s),
        calibrated_days=round(h.days, 3),
        target_false_alarms_per_30d=target_false_alarms_per_30d,
    )
