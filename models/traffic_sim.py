"""Traffic on a two-direction street past a radar and a pair of loop detectors.

Physics (per direction, 5-minute steps; the site's numbers are in ``models.sites.Road``,
``Demand`` and ``Faults``; the values quoted are the training site's):

- **Fundamental diagram (Greenshields), per lane.** Speed falls linearly with density,
  ``v = vf * (1 - k / kj)``, so flow ``q = vf * k * (1 - k / kj)`` peaks at ``vf * kj / 4`` when
  ``k = kj / 2``. Free-flow speed ``vf`` = 14.2 m/s (51 km/h on a 50 km/h street), jam density
  ``kj`` = 130 veh/km. Signals cut the usable capacity to 85 % of the diagram's maximum. With
  several lanes, demand, capacity and queue spread evenly over them (loops report per-lane
  occupancy, the radar counts all lanes).
- **Uncongested:** the detector sees the demand flow on the free branch of the diagram
  (``k = kj/2 * (1 - sqrt(1 - q / q_max))``), so speeds sag as flow approaches capacity.
- **Congested:** demand above capacity queues (a point queue, vehicles conserved). While a queue
  stands, the detector sits inside it on the congested branch: density rises from ``kj/2``
  towards ``kj`` as the queue grows (``k = kj/2 + kj/2 * (1 - exp(-Q / 60 veh))``), speed falls
  with it, and the queue discharges at capacity.
- **Demand:** weekday double peak (inbound towards the centre in the morning, outbound in the
  evening), a Friday afternoon shift, broad single midday humps at weekends, scaled by the
  site's demand level; a day-to-day factor (log-normal, 7 %) and minute-scale fluctuations
  (AR(1)).
- **Weather:** rain lowers free-flow speed by 8 % and capacity by 10 %; near-freezing wet roads
  (T < 1 degC, RH > 85 %) by 15 % each.
- **Incidents:** about one per direction every ten days, mostly in daytime, halving capacity for
  20-90 minutes.
- **Measurement:** the radar detects 97 % of vehicles (Poisson counts); a window's mean speed
  scatters with the per-vehicle spread (12 % + 0.8 m/s) over the number of vehicles; loops
  report occupancy = density x 6.5 m effective length, with noise. Faults: radar and loop
  outages (windows with no data), and rare ghost targets that inflate a window's mean speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.sites import Demand, Faults, Road

QUEUE_SCALE_VEH = 60.0  # per lane
EFFECTIVE_LENGTH_M = 6.5
DETECTION_P = 0.97


@dataclass(frozen=True)
class DirectionState:
    flow_veh_h: np.ndarray
    speed_m_s: np.ndarray
    density_veh_km: np.ndarray
    queue_veh: np.ndarray


def _bump(h: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((h - centre) / width) ** 2)


def demand_profile(
    hour: np.ndarray, dow: np.ndarray, inbound: bool, d: Demand | None = None
) -> np.ndarray:
    """Mean demand (veh/h, before the level) by local hour (fractional) and day of week
    (Monday = 0)."""
    d = d or Demand()
    am, pm = (d.am_in_veh_h, d.pm_in_veh_h) if inbound else (d.am_out_veh_h, d.pm_out_veh_h)
    night = d.night_veh_h + 25.0 * _bump(hour, 23.0, 1.5)
    ramp_up = np.clip((hour - d.day_start_h) / 2.0, 0, 1)
    weekday = (
        night
        + am * _bump(hour, d.am_peak_h, d.am_width_h)
        + pm * _bump(hour, d.pm_peak_h, d.pm_width_h)
        + d.day_veh_h * ramp_up * np.clip((d.day_end_h - hour) / 2.0, 0, 1)
    )
    # Friday: a lighter morning, an earlier and broader evening peak, a longer day.
    friday = (
        night
        + 0.9 * am * _bump(hour, d.am_peak_h, d.am_width_h)
        + 1.05 * pm * _bump(hour, d.friday_pm_peak_h, 1.5)
        + (d.day_veh_h + 40.0) * ramp_up * np.clip((d.day_end_h + 1.0 - hour) / 2.0, 0, 1)
    )
    saturday = night + 40.0 + d.saturday_veh_h * _bump(hour, 13.0, 3.0)
    sunday = night + 20.0 + d.sunday_veh_h * _bump(hour, 15.0, 3.0)
    return np.select([dow <= 3, dow == 4, dow == 5], [weekday, friday, saturday], sunday)


def _episodes(
    n: int, rate_per_step: float, min_len: int, max_len: int, *, rng: np.random.Generator,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """A boolean mask of randomly placed episodes."""
    mask = np.zeros(n, dtype=bool)
    p = np.full(n, rate_per_step) if weight is None else rate_per_step * weight / weight.mean()
    for start in np.flatnonzero(rng.random(n) < p):
        mask[start : start + int(rng.integers(min_len, max_len + 1))] = True
    return mask


def simulate_direction(
    demand: np.ndarray, vf: np.ndarray, capacity: np.ndarray, step_s: float,
    kj: float = 130.0,
) -> DirectionState:
    """One lane: demand and capacity in veh/h per lane, density per lane, queue per lane."""
    n = len(demand)
    flow = np.empty(n)
    speed = np.empty(n)
    density = np.empty(n)
    queue = np.empty(n)
    q_len = 0.0
    hours = step_s / 3600.0
    for i in range(n):
        arriving = demand[i] * hours
        cap = capacity[i] * hours
        if q_len > 0.5:
            served = min(q_len + arriving, cap)
            k = kj / 2 * (2 - np.exp(-q_len / QUEUE_SCALE_VEH))
            flow[i] = served / hours
        else:
            served = min(arriving, cap)
            qm = vf[i] * 3.6 * kj / 4.0
            ratio = min(served / hours / qm, 1.0)
            k = kj / 2 * (1 - np.sqrt(1 - ratio))
            flow[i] = served / hours
        q_len = q_len + arriving - served
        density[i] = k
        speed[i] = max(vf[i] * (1 - k / kj), 1.5)
        queue[i] = q_len
    return DirectionState(flow, speed, density, queue)


def simulate_traffic(
    *, hour: np.ndarray, dow: np.ndarray, day_index: np.ndarray, temperature: np.ndarray,
    humidity: np.ndarray, raining: np.ndarray, step_s: float, rng: np.random.Generator,
    road: Road | None = None, demand: Demand | None = None, faults: Faults | None = None,
) -> dict[str, np.ndarray]:
    """Window-level measurements in the CSV schema's traffic columns."""
    road, demand, faults = road or Road(), demand or Demand(), faults or Faults()
    n = len(hour)
    kj = road.jam_density_veh_km
    per_day = rng.lognormal(0.0, demand.day_to_day_sigma, int(day_index.max()) + 1)[day_index]
    icy = (temperature < 1.0) & (humidity > 85.0)
    vf = road.free_flow_m_s * np.where(raining, 0.92, 1.0) * np.where(icy, 0.85, 1.0)
    q_max = road.free_flow_m_s * 3.6 * kj / 4.0
    base_cap = q_max * road.signal_factor * np.where(raining, 0.90, 1.0) * np.where(icy, 0.85, 1.0)
    daytime = 0.2 + _bump(hour, 13.0, 4.0)
    out: dict[str, np.ndarray] = {}
    occ = []
    for name, inbound in (("in", True), ("out", False)):
        phi = np.exp(-step_s / 1800.0)
        wiggle = np.empty(n)
        acc = 0.0
        shocks = rng.normal(0.0, 0.06 * np.sqrt(1 - phi**2), n)
        for i in range(n):
            acc = phi * acc + shocks[i]
            wiggle[i] = acc
        wanted = demand_profile(hour, dow, inbound, demand) * per_day * np.exp(wiggle)
        wanted *= np.where(raining, 1.03, 1.0) * demand.level
        incident = _episodes(n, step_s / (faults.incident_days * 86_400), 4, 18, rng=rng,
                             weight=daytime)
        cap = base_cap * np.where(incident, 0.5, 1.0)
        st = simulate_direction(wanted / road.lanes, vf, cap, step_s, kj)
        flow = st.flow_veh_h * road.lanes
        counts = rng.poisson(flow * step_s / 3600.0 * DETECTION_P).astype(float)
        spread = 0.12 * st.speed_m_s + 0.8
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = st.speed_m_s + rng.normal(0, 1, n) * spread / np.sqrt(counts)
        mean = np.where(counts > 0, np.maximum(mean, 0.5), np.nan)
        # A ghost target (a reflection, a bird) adds one implausibly fast event to a window.
        ghost = (rng.random(n) < faults.ghost_p) & (counts > 0)
        mean = np.where(ghost, (mean * counts + rng.uniform(20, 35, n)) / (counts + 1), mean)
        counts = counts + ghost
        out[f"vehicles_{name}"] = counts
        out[f"speed_{name}_mean"] = mean
        out[f"true_speed_{name}"] = st.speed_m_s
        out[f"incident_{name}"] = incident.astype(float)
        occ.append(st.density_veh_km * EFFECTIVE_LENGTH_M / 1000.0)
    occupancy = np.clip((occ[0] + occ[1]) / 2 + rng.normal(0, 0.01, n), 0, 1)

    radar_out = _episodes(n, step_s / (faults.radar_outage_days * 86_400), 6, 72, rng=rng)
    loop_out = _episodes(n, step_s / (faults.loop_outage_days * 86_400), 6, 144, rng=rng)
    for key in ("vehicles_in", "vehicles_out", "speed_in_mean", "speed_out_mean"):
        out[key] = np.where(radar_out, np.nan, out[key])
    out["occupancy"] = np.where(loop_out, np.nan, occupancy)
    return out
