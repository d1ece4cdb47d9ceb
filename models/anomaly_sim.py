"""A street cabinet at the circuit level, with labelled faults, for the anomaly detectors.

**Window: 60 s.** The faults to find are short (a meter glitch lasts one reading) or must be
reported within 15 minutes, and every detector needs a few windows of persistence before it
may raise an alarm: at 300 s, three windows are already 15 minutes and a one-reading spike is
averaged down five-fold into charger noise. 60 s is also the energy window of the example
gateway config. Loads are built on a 10 s grid (the meters' polling period) and averaged.

Channels, as the gateway would see them per window: the cabinet feed meter (``main``), a
redundant meter on the same feed (``check``, polled 2 s after it, so a load step or ramp
falls into neighbouring windows a little differently), the lighting circuit, each charge point
on its own meter, the photocell input (fraction of the window calling for light) and solar
elevation.

Loads: luminaires on a photocell (switching elevation -2 +/- 0.7 deg per night, 1.5 deg
earlier under rain, optional midnight dimming, luminaires failing now and then until
replaced), charge points (Poisson arrivals by time of day, constant power then a linear
taper), base electronics plus standby per charge point, a heater and a fan on thermostats.
Meters: a static gain error per meter (0.2 %), 0.1 % + 0.3 W noise per window mean, 0.01 W
resolution, bus outages (no data).

Faults (from ``fault_free_days`` on, never overlapping, each labelled with type and interval):
``meter_stuck`` (main or check repeats its last value, or reads 0 W, 20 min to 6 h),
``meter_spike`` (one window reads 2-4x + 500 W), ``meter_drift`` (gain error ramps to 4-12 %
over 1-12 h and stays 6-36 h; labelled from when it exceeds 2 %, the meters' combined
accuracy), ``lamps_dark`` (a breaker drops 1/3, 2/3 or all lamps for the night, or the
photocell sticks on "day"), ``lamps_lit`` (a contactor or override keeps 1/3 or all lamps lit
through the day, or the photocell sticks on "night"), ``unexplained_load`` (400-900 W for
1-4 h on the feed and no metered circuit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np

from agent.anomaly import Sample
from agent.anomaly.calibrate import History
from models.sites import PRESETS, Climate, SiteParams
from models.sun import day_of_year, solar_position
from models.weather import simulate_weather

WINDOW_S = 60
SUB_S = 10
SUB = WINDOW_S // SUB_S
DAY_S = 86_400
CHECK_LAG_S = 2.0  # the check meter answers this long after the feed meter


@dataclass(frozen=True)
class FaultRates:
    """Expected faults per week of each type."""

    meter_stuck: float = 1.0
    meter_spike: float = 2.0
    meter_drift: float = 0.5
    lamps_dark: float = 1.0
    lamps_lit: float = 1.0
    unexplained_load: float = 1.0


@dataclass(frozen=True)
class CabinetSite:
    name: str
    lat_deg: float
    lon_deg: float
    timezone: str
    chargers_kw: tuple[float, ...]
    luminaires: int
    luminaire_w: float
    base_w: float
    dim_level: float = 0.5  # lit power during the dimming hours; 1.0 = no dimming
    dim_hours: tuple[int, int] = (23, 5)
    heater_w: float = 200.0
    fan_w: float = 40.0
    standby_w: float = 8.0  # per charge point
    arrival_scale: float = 1.0  # charging demand per point relative to the training site
    climate: Climate = field(default_factory=Climate)
    faults: FaultRates = field(default_factory=FaultRates)
    seed: int = 7
    start: str = "2025-01-06"


# Street-lighting schedules are not part of a preset (the traffic and energy models never see
# them): lit power during the dimming hours and the local hours it applies.
DIMMING: dict[str, tuple[float, tuple[int, int]]] = {
    "berlin-street": (0.5, (23, 5)),
    "chicago-arterial": (1.0, (23, 5)),
    "seville-suburb": (0.6, (0, 6)),
    "heldout-ring": (0.7, (0, 5)),
}


def cabinet_site(params: SiteParams) -> CabinetSite:
    """The cabinet of a ``models.sites`` preset: its place, climate, luminaires and chargers."""
    cab = params.cabinet
    dim, hours = DIMMING.get(params.name, (1.0, (23, 5)))
    return CabinetSite(
        params.name, params.lat_deg, params.lon_deg, params.timezone, cab.chargers_kw,
        cab.luminaires, cab.luminaire_w, cab.base_w, dim_level=dim, dim_hours=hours,
        heater_w=cab.heater_w, fan_w=cab.fan_w, standby_w=cab.standby_w,
        arrival_scale=cab.ev_arrivals, climate=params.climate, seed=params.seed,
        start=params.start,
    )


SITES = {name: cabinet_site(p) for name, p in PRESETS.items()}
TRAINING_SITE = SITES["berlin-street"]
FOREIGN_SITES = tuple(SITES[n] for n in ("chicago-arterial", "seville-suburb"))


@dataclass(frozen=True)
class Fault:
    type: str
    start_s: float
    end_s: float
    channel: str
    detail: str
    mechanism: str = ""  # what failed, where a type has several causes (e.g. "photocell")


@dataclass(frozen=True)
class CabinetRun:
    site: CabinetSite
    ts_s: np.ndarray  # window starts, UTC seconds
    main_w: np.ndarray
    check_w: np.ndarray
    lights_w: np.ndarray
    chargers_w: np.ndarray  # (windows, points)
    photocell: np.ndarray
    elevation_deg: np.ndarray
    local_hour: np.ndarray
    faults: list[Fault]

    def __len__(self) -> int:
        return len(self.ts_s)

    def history(self, days: float) -> History:
        n = int(days * DAY_S // WINDOW_S)
        return History(WINDOW_S, self.main_w[:n], self.check_w[:n], self.lights_w[:n],
                       self.chargers_w[:n], self.photocell[:n], self.elevation_deg[:n],
                       self.local_hour[:n])

    def samples(self, from_day: float = 0.0) -> list[Sample]:
        first = int(from_day * DAY_S // WINDOW_S)
        ns = 1_000_000_000
        cols = (self.main_w, self.check_w, self.lights_w, self.photocell, self.elevation_deg,
                self.local_hour)
        rows = zip(self.ts_s[first:].tolist(), *(c[first:].tolist() for c in cols),
                   map(tuple, self.chargers_w[first:].tolist()), strict=True)
        return [Sample(int(t) * ns, (int(t) + WINDOW_S) * ns, m, c, lw, ch, p, e, h)
                for t, m, c, lw, p, e, h, ch in rows]


def local_time(ts_s: np.ndarray, tz: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local fractional hour, day of week (Monday = 0) and local day number."""
    zone = ZoneInfo(tz)
    hours = (ts_s // 3600).astype(np.int64)
    uniq, inverse = np.unique(hours, return_inverse=True)
    off = np.array([datetime.fromtimestamp(int(h) * 3600, tz=zone).utcoffset().total_seconds()  # type: ignore[union-attr]
                    for h in uniq])[inverse]
    local = ts_s + off
    day = (local // DAY_S).astype(np.int64)
    return (local % DAY_S) / 3600.0, (day + 3) % 7, day


def _arrivals_per_h(hour: np.ndarray, dow: np.ndarray) -> np.ndarray:
    """Charging arrivals per hour at one point: commuter peaks on weekdays, a weekend hump."""
    def peak(centre: float, width: float) -> np.ndarray:
        return np.exp(-0.5 * ((hour - centre) / width) ** 2)

    workday = 0.03 + 0.30 * peak(8.3, 1.1) + 0.12 * peak(12.5, 1.6) + 0.38 * peak(17.6, 1.5)
    weekend = 0.03 + 0.25 * peak(13.5, 3.0)
    return np.where(dow < 5, workday, weekend)


def _charge_point(point_kw: float, rate_h: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Power (W) of one charge point on the 10 s grid."""
    n = len(rate_h)
    power = np.zeros(n)
    free_at = 0
    for t in np.flatnonzero(rng.random(n) < rate_h * SUB_S / 3600.0):
        if t < free_at:
            continue  # occupied: the driver goes elsewhere
        kw = min(point_kw, float(rng.choice([3.7, 7.4, 11.0, 22.0], p=[0.2, 0.35, 0.35, 0.1])))
        kw *= rng.uniform(0.95, 1.0)
        kwh = float(np.clip(rng.lognormal(np.log(14.0), 0.5), 2.0, 60.0))
        bulk = round(0.85 * kwh / kw * 3600 / SUB_S)
        taper = max(round(0.3 * kwh / kw * 3600 / SUB_S), 1)
        shape = np.concatenate([np.full(bulk, kw), np.linspace(kw, 0.0, taper, endpoint=False)])
        seg = power[t:t + len(shape)]
        seg += shape[:len(seg)] * 1000.0
        free_at = int(t) + len(shape) + int(rng.lognormal(np.log(20 * 60 / SUB_S), 0.8))
    return power


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index runs where ``mask`` is true."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(),
                    strict=True))


class _Schedule:
    """Places faults so that none overlaps another (with a guard) or the fault-free period."""

    def __init__(self, t0: float, t1: float, guard_s: float = 3600.0) -> None:
        self.t0, self.t1, self.guard = t0, t1, guard_s
        self.taken: list[tuple[float, float]] = []

    def free(self, a: float, b: float) -> bool:
        if a < self.t0 or b > self.t1:
            return False
        return all(b + self.guard <= x or a >= y + self.guard for x, y in self.taken)

    def take(self, a: float, b: float) -> None:
        self.taken.append((a, b))


def _ar1(n: int, tau: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    phi = float(np.exp(-1.0 / tau))
    shocks = rng.normal(0.0, sigma * np.sqrt(1 - phi**2), n).tolist()
    out = np.empty(n)
    acc = float(rng.normal(0.0, sigma))
    for i, e in enumerate(shocks):
        acc = phi * acc + e
        out[i] = acc
    return out


def _thermostats(inside: np.ndarray, heater_w: float, fan_w: float) -> np.ndarray:
    out = np.zeros(len(inside))
    heat = fan = False
    for i, t in enumerate(inside.tolist()):
        heat = t < 10.0 if heat else t < 5.0
        fan = t > 30.0 if fan else t > 35.0
        out[i] = heater_w * heat + fan_w * fan
    return out


def _lamp_faults(sched: _Schedule, *, photocell: np.ndarray, lights: np.ndarray, full_w: np.ndarray,
                 ts_sub: np.ndarray, site: CabinetSite, weeks: float,
                 rng: np.random.Generator) -> list[Fault]:
    """Dark nights and lit days, edited into the 10 s photocell and lighting series."""
    faults: list[Fault] = []
    nights = [r for r in _runs(photocell) if r[1] - r[0] > 3600 // SUB_S]
    days = [r for r in _runs(~photocell) if r[1] - r[0] > 3600 // SUB_S]
    for kind, spans in (("lamps_dark", nights), ("lamps_lit", days)):
        rate = getattr(site.faults, kind)
        for _ in range(rng.poisson(rate * weeks)):
            for _try in range(50):
                a, b = spans[int(rng.integers(len(spans)))]
                if rng.random() < 0.3:  # the fault starts part way through the night or day
                    a = int(rng.integers(a, a + (b - a) // 2))
                if sched.free(float(ts_sub[a]), float(ts_sub[b - 1]) + SUB_S):
                    break
            else:
                continue
            sched.take(float(ts_sub[a]), float(ts_sub[b - 1]) + SUB_S)
            span = slice(a, b)
            via_photocell = rng.random() < 0.25
            if kind == "lamps_dark":
                if via_photocell:
                    photocell[span] = False
                    lights[span] = 0.0
                    detail = "photocell stuck on day"
                else:
                    frac = float(rng.choice([1 / 3, 2 / 3, 1.0]))
                    lights[span] *= 1.0 - frac
                    detail = f"breaker: {frac:.0%} of lamps dark"
            elif via_photocell:
                photocell[span] = True
                lights[span] = full_w[span]
                detail = "photocell stuck on night"
            else:
                frac = float(rng.choice([1 / 3, 1.0]))
                lights[span] = full_w[span] * frac
                detail = f"contactor: {frac:.0%} of lamps lit"
            mechanism = detail.split()[0].rstrip(":")
            faults.append(Fault(kind, float(ts_sub[a]), float(ts_sub[b - 1]) + SUB_S, "lights",
                                detail, mechanism))
    return faults


def _place(sched: _Schedule, rng: np.random.Generator, ts: np.ndarray, min_w: int,
           max_w: int) -> tuple[int, int] | None:
    for _ in range(50):
        length = int(rng.integers(min_w, max_w + 1))
        a = int(rng.integers(0, len(ts) - length))
        if sched.free(float(ts[a]), float(ts[a + length - 1]) + WINDOW_S):
            sched.take(float(ts[a]), float(ts[a + length - 1]) + WINDOW_S)
            return a, a + length
    return None


def simulate_cabinet(site: CabinetSite, days: float, *, fault_free_days: float = 14.0,
                     with_faults: bool = True, seed: int | None = None,
                     split_days: float | None = None) -> CabinetRun:
    """``days`` of one cabinet at 60 s windows; faults only after ``fault_free_days``.

    No fault spans ``split_days`` (the end of a calibration history), so every labelled fault
    lies wholly in the history or wholly in the weeks scored after it.

    The normal operation (loads, weather, meter noise) comes from its own random streams, so
    the same cabinet with ``with_faults=False`` is the same cabinet without its faults.
    """
    seed = site.seed if seed is None else seed
    rng = np.random.default_rng([seed, 0])
    noise = np.random.default_rng([seed, 1])
    frng = np.random.default_rng([seed, 2])
    start = int(datetime.fromisoformat(site.start).replace(tzinfo=ZoneInfo(site.timezone))
                .timestamp())
    start -= start % WINDOW_S
    n = int(days * DAY_S // WINDOW_S)
    ts = start + np.arange(n, dtype=np.int64) * WINDOW_S
    ts_sub = start + np.arange(n * SUB, dtype=np.int64) * SUB_S
    mid = ts + WINDOW_S / 2
    elevation, solar_h = solar_position(mid, site.lat_deg, site.lon_deg)
    el_sub, _ = solar_position(ts_sub + SUB_S / 2, site.lat_deg, site.lon_deg)
    hour, _, _ = local_time(mid.astype(np.int64), site.timezone)
    hour_sub, dow_sub, day_sub = local_time(ts_sub, site.timezone)
    wx = simulate_weather(day_of_year(ts), solar_h, WINDOW_S, rng, site.climate)
    temperature = wx.temperature

    # Photocell: one switching elevation per night (a night keeps its value past midnight).
    night = day_sub - (hour_sub < 12)
    night -= night.min()
    switch_el = rng.normal(-2.0, 0.7, int(night.max()) + 1)[night]
    switch_el += np.repeat(np.where(wx.raining, 1.5, 0.0), SUB)
    photocell = el_sub < switch_el

    failed = np.zeros(n)
    for s in np.flatnonzero(rng.random(n) < WINDOW_S / (12 * DAY_S)):
        failed[s:s + int(rng.integers(14, 43)) * DAY_S // WINDOW_S] += 1
    working = np.repeat(site.luminaires - np.minimum(failed, site.luminaires), SUB)
    d0, d1 = site.dim_hours
    dimmed = ((hour_sub >= d0) | (hour_sub < d1)) if d0 > d1 else (hour_sub >= d0) & (hour_sub < d1)
    full_w = working * site.luminaire_w * 1.04  # LED driver losses
    lit_w = full_w * np.where(dimmed, site.dim_level, 1.0)
    lights = np.where(photocell, lit_w, 0.0)

    rate = _arrivals_per_h(hour_sub, dow_sub) * site.arrival_scale
    points = np.stack([_charge_point(kw, rate, rng) for kw in site.chargers_kw], axis=1)

    inside = temperature + 4.0 + 8.0 * np.clip(np.sin(np.radians(elevation)), 0, None)
    cabinet = _thermostats(inside, site.heater_w, site.fan_w)
    # Electronics wander slowly (router traffic, controller duty): AR(1), 6 h, 3 W.
    cabinet += site.base_w + site.standby_w * len(site.chargers_kw) + _ar1(n, 360.0, 3.0, rng)
    cabinet += rng.normal(0, 1.0, n)
    outage = np.zeros(n, dtype=bool)
    for s in np.flatnonzero(rng.random(n) < WINDOW_S / (10 * DAY_S)):
        outage[s:s + int(rng.integers(1, 11))] = True
    gains = 1.0 + rng.normal(0, 0.002, 3 + len(site.chargers_kw))

    faults: list[Fault] = []
    extra = np.zeros(n * SUB)
    t_faults = float(ts[0]) + fault_free_days * DAY_S
    sched = _Schedule(t_faults, float(ts[-1]))
    if split_days is not None:
        t_split = float(ts[0]) + split_days * DAY_S
        sched.take(t_split, t_split)
    weeks = max(days - fault_free_days, 0.0) / 7.0
    if with_faults:
        faults += _lamp_faults(sched, photocell=photocell, lights=lights, full_w=full_w,
                               ts_sub=ts_sub, site=site, weeks=weeks, rng=frng)
        for _ in range(frng.poisson(site.faults.unexplained_load * weeks)):
            a = int(frng.integers(0, n * SUB - 4 * 3600 // SUB_S))
            length = int(frng.uniform(1, 4) * 3600 / SUB_S)
            if sched.free(float(ts_sub[a]), float(ts_sub[a] + length * SUB_S)):
                sched.take(float(ts_sub[a]), float(ts_sub[a] + length * SUB_S))
                watts = frng.uniform(400, 900)
                extra[a:a + length] = watts
                faults.append(Fault("unexplained_load", float(ts_sub[a]),
                                    float(ts_sub[a] + length * SUB_S), "feed", f"{watts:.0f} W"))

    def window_mean(x: np.ndarray, lag_s: float = 0.0) -> np.ndarray:
        w = np.asarray(x.reshape(n, SUB).mean(axis=1), dtype=float)
        if lag_s == 0.0:
            return w
        # Polled ``lag_s`` later: that share of the window comes from the next 10 s sample.
        later = np.asarray(np.roll(x, -1).reshape(n, SUB).mean(axis=1), dtype=float)
        out: np.ndarray = w + (later - w) * lag_s / SUB_S
        return out

    def measure(true: np.ndarray, gain: float, clip0: bool) -> np.ndarray:
        m = true * gain * (1 + noise.normal(0, 0.001, n)) + noise.normal(0, 0.3, n)
        m = np.round(np.maximum(m, 0.0) if clip0 else m, 2)
        return np.where(true < 0.5, 0.0, m) if clip0 else m

    total = np.repeat(cabinet, SUB) + lights + points.sum(axis=1) + extra
    main = measure(window_mean(total), gains[0], False)
    check = measure(window_mean(total, CHECK_LAG_S), gains[1], False)
    lights_m = measure(window_mean(lights), gains[2], True)
    chargers = np.stack([measure(window_mean(points[:, k]), gains[3 + k], True)
                         for k in range(points.shape[1])], axis=1)
    if with_faults:
        faults += _meter_faults(sched, main=main, check=check, ts=ts, site=site, weeks=weeks,
                                rng=frng)
    nan = np.nan
    return CabinetRun(
        site=site, ts_s=ts,
        main_w=np.where(outage, nan, main), check_w=np.where(outage, nan, check),
        lights_w=np.where(outage, nan, lights_m),
        chargers_w=np.where(outage[:, None], nan, chargers),
        photocell=np.where(outage, nan, window_mean(photocell.astype(float))),
        elevation_deg=elevation, local_hour=hour,
        faults=sorted(faults, key=lambda f: f.start_s),
    )


def _meter_faults(sched: _Schedule, *, main: np.ndarray, check: np.ndarray, ts: np.ndarray,
                  site: CabinetSite, weeks: float, rng: np.random.Generator) -> list[Fault]:
    """Stuck, spiking and drifting feed meters, edited into the measured windows in place."""
    faults: list[Fault] = []
    meters = {"main": main, "check": check}
    for _ in range(rng.poisson(site.faults.meter_drift * weeks)):
        ramp = int(rng.uniform(1, 12) * 60)
        hold = int(rng.uniform(6, 36) * 60)
        span = _place(sched, rng, ts, ramp + hold, ramp + hold)
        if span is None:
            continue
        a, b = span
        name = str(rng.choice(["main", "check"]))
        final = float(rng.uniform(0.04, 0.12)) * float(rng.choice([-1.0, 1.0]))
        err = final * np.minimum(np.arange(b - a) / ramp, 1.0)
        meters[name][a:b] *= 1.0 + err
        first = a + int(np.argmax(np.abs(err) > 0.02))
        faults.append(Fault("meter_drift", float(ts[first]), float(ts[b - 1]) + WINDOW_S, name,
                            f"{final:+.1%} over {ramp} min"))
    for _ in range(rng.poisson(site.faults.meter_stuck * weeks)):
        span = _place(sched, rng, ts, 20, 360)
        if span is None:
            continue
        a, b = span
        name = str(rng.choice(["main", "check"]))
        x = meters[name]
        if rng.random() < 0.6:
            x[a + 1:b] = x[a]  # the register stops updating after window a
            detail, a = "frozen", a + 1
        else:
            x[a:b] = 0.0
            detail = "reads 0 W"
        faults.append(Fault("meter_stuck", float(ts[a]), float(ts[b - 1]) + WINDOW_S, name,
                            detail, detail.split()[-1].replace("W", "zero")))
    for _ in range(rng.poisson(site.faults.meter_spike * weeks)):
        span = _place(sched, rng, ts, 1, 1)
        if span is None:
            continue
        a = span[0]
        name = str(rng.choice(["main", "check"]))
        meters[name][a] = meters[name][a] * rng.uniform(2.0, 4.0) + 500.0
        faults.append(Fault("meter_spike", float(ts[a]), float(ts[a]) + WINDOW_S, name, ""))
    return faults
