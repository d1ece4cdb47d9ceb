"""Window values derived from the channels' quantities, whatever the sensors are called.

Traffic-like streams (any ``speed_in``/``speed_out``/``occupancy``/``vehicle_count``):
``vehicles`` (radar vehicle events in the window, else the sum of loop ``vehicle_count``),
``flow_veh_h``, ``speed_in_mean``, ``speed_out_mean``, ``speed_mean`` (m/s, over vehicle
events) and ``occupancy`` (mean of the occupancy channels, 0..1).

Energy-like streams (any ``active_power``/``power``): ``power_mean_w`` (sum over meters of the
time-weighted mean power) and ``energy_wh`` (trapezoidal integral of power over the window).
The integral itself is accumulated reading by reading in ``agent.pipeline.windows``
(``PowerIntegral``), because it needs consecutive samples, which window statistics no longer hold.

A value with no input is NaN. A stream with a radar but no vehicle in the window has input:
zero vehicles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Final

from agent.readings import ChannelStats

RADAR: Final = frozenset({"speed_in", "speed_out"})
TRAFFIC: Final = RADAR | {"occupancy", "vehicle_count"}
POWER: Final = frozenset({"active_power", "power"})
TRAFFIC_NAMES: Final = ("vehicles", "flow_veh_h", "speed_in_mean", "speed_out_mean",
                        "speed_mean", "occupancy")
ENERGY_NAMES: Final = ("power_mean_w", "energy_wh")

# What drivers are known to emit (CHANNELS.md), so a stream is known to be traffic-like before
# its first vehicle arrives.
DRIVER_QUANTITIES: Final[dict[str, frozenset[str]]] = {
    "ops243": RADAR,
    "pzem004t": frozenset({"voltage", "current", "active_power", "energy", "frequency",
                           "power_factor", "alarm"}),
    "ina219": frozenset({"bus_voltage", "shunt_voltage", "current", "power"}),
}

NS_PER_HOUR: Final = 3600 * 1_000_000_000
_NAN = math.nan


@dataclass(frozen=True, slots=True)
class PowerIntegral:
    """Power integrated over the parts of a window the samples bridge."""

    energy_wh: float
    covered_s: float


def _quantity(channel: str) -> str:
    return channel.rpartition(".")[2]


def _sum_mean(stats: list[ChannelStats]) -> tuple[float, int]:
    """Sum of the values and count over channels with data."""
    total = 0.0
    n = 0
    for st in stats:
        if st.count:
            total += st.mean * st.count
            n += st.count
    return total, n


def _mean(stats: list[ChannelStats]) -> float:
    total, n = _sum_mean(stats)
    return total / n if n else _NAN


def traffic(window_s: float, channels: Mapping[str, ChannelStats],
            quantities: Set[str]) -> dict[str, float]:
    by_q: dict[str, list[ChannelStats]] = {q: [] for q in TRAFFIC}
    for name, st in channels.items():
        q = _quantity(name)
        if q in by_q:
            by_q[q].append(st)
    speeds_in, speeds_out = by_q["speed_in"], by_q["speed_out"]
    if quantities & RADAR:
        vehicles = float(sum(st.count for st in speeds_in) + sum(st.count for st in speeds_out))
    else:
        total, n = _sum_mean(by_q["vehicle_count"])
        vehicles = float(round(total)) if n else _NAN
    occ = [st.mean for st in by_q["occupancy"] if st.count]
    return {
        "vehicles": vehicles,
        "flow_veh_h": vehicles * 3600.0 / window_s,
        "speed_in_mean": _mean(speeds_in),
        "speed_out_mean": _mean(speeds_out),
        "speed_mean": _mean(speeds_in + speeds_out),
        "occupancy": sum(occ) / len(occ) if occ else _NAN,
    }


def energy(channels: Mapping[str, ChannelStats],
           integrals: Mapping[str, PowerIntegral]) -> dict[str, float]:
    power_sum = 0.0
    energy_sum = 0.0
    seen = False
    for name, st in channels.items():
        if _quantity(name) not in POWER:
            continue
        integral = integrals.get(name)
        if integral is not None and integral.covered_s > 0.0:
            # Also for a window with no sample of its own that a trapezoid crosses.
            power_sum += integral.energy_wh * 3600.0 / integral.covered_s
            energy_sum += integral.energy_wh
        elif st.count:
            power_sum += st.mean  # a single sample: nothing to weight by time
        else:
            continue
        seen = True
    if not seen:
        return {"power_mean_w": _NAN, "energy_wh": _NAN}
    return {"power_mean_w": power_sum, "energy_wh": energy_sum}


def derive(window_s: float, channels: Mapping[str, ChannelStats],
           integrals: Mapping[str, PowerIntegral], quantities: Set[str]) -> dict[str, float]:
    """All derived values of one window; ``quantities`` are those the stream carries."""
    out: dict[str, float] = {}
    if quantities & TRAFFIC:
        out.update(traffic(window_s, channels, quantities))
    if quantities & POWER:
        out.update(energy(channels, integrals))
    return out
