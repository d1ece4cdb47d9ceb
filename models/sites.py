"""Site descriptions for the simulator, and the named presets the models are evaluated on.

A ``SiteParams`` fixes everything the simulator draws from besides its random seed: the street
(free-flow speed, lanes, jam density), the demand level and daily shape, where the site is
(latitude, longitude, time zone) and its climate, the cabinet (luminaires, charge points, base
load, heater and fan) and how often sensors and loads misbehave. All of it is frozen, so a
preset plus a seed names one data set exactly.

Presets (``PRESETS``; ``python -m models.simulate --preset NAME``):

- ``berlin-street``: the site the shipped models are trained on (the simulator's defaults).
- ``chicago-arterial``: a 60 km/h arterial, two lanes each way, more demand, four chargers.
- ``seville-suburb``: a quiet 40 km/h southern suburb, more luminaires, one charger, hot summers.
- ``heldout-ring``: a held-out site for the transfer table only (see its ``about``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Road:
    """The street past the radar and loops (per direction; both directions alike)."""

    free_flow_m_s: float = 14.2  # Greenshields free-flow speed (51 km/h on a 50 km/h street)
    lanes: int = 1  # lanes per direction; capacity and queue storage scale with them
    jam_density_veh_km: float = 130.0  # per lane
    signal_factor: float = 0.85  # share of the diagram's capacity that signals leave usable


@dataclass(frozen=True)
class Demand:
    """Demand per direction: ``level`` times a weekday/Friday/weekend shape (veh/h).

    The shape's amplitudes are those of one lane of the training street; ``level`` scales all
    of it (a two-lane street at level 2 carries twice the traffic at the same lane load).
    """

    level: float = 1.0
    am_peak_h: float = 7.75  # local hour of the morning peak
    am_width_h: float = 0.85
    pm_peak_h: float = 17.1  # weekday evening peak
    pm_width_h: float = 1.25
    friday_pm_peak_h: float = 15.9
    am_in_veh_h: float = 1000.0  # morning peak towards the centre
    am_out_veh_h: float = 560.0
    pm_in_veh_h: float = 560.0
    pm_out_veh_h: float = 830.0  # evening peak away from the centre
    day_veh_h: float = 520.0  # daytime plateau between the peaks
    day_start_h: float = 6.5  # the plateau ramps up over 2 h from here
    day_end_h: float = 20.5  # ... and down over the 2 h before this (Friday: one hour later)
    saturday_veh_h: float = 760.0  # broad midday hump
    sunday_veh_h: float = 480.0
    night_veh_h: float = 35.0
    day_to_day_sigma: float = 0.07  # log-normal day factor


@dataclass(frozen=True)
class Climate:
    """Ambient weather: seasonal mean and amplitude, rain spells."""

    mean_c: float = 9.5  # annual mean temperature
    season_c: float = 10.0  # half the summer-winter difference of the daily mean
    coldest_doy: float = 25.0  # day of year with the coldest mean (late January)
    rain_every_h: float = 36.0  # mean dry spell between rain spells
    rain_spell_h: float = 3.0  # mean rain spell length


@dataclass(frozen=True)
class Cabinet:
    """The street cabinet's loads."""

    luminaires: int = 24
    luminaire_w: float = 55.0
    chargers_kw: tuple[float, ...] = (11.0, 7.4)  # AC charge points, in the order drivers try
    ev_arrivals: float = 1.0  # scales the time-of-day arrival rate of cars wanting to charge
    base_w: float = 45.0  # controllers, router, gateway
    standby_w: float = 8.0  # per charge point
    heater_w: float = 200.0
    fan_w: float = 40.0


@dataclass(frozen=True)
class Faults:
    """How often things go wrong: mean days between starts of each kind of episode."""

    incident_days: float = 10  # per direction; capacity halved for 20-90 min
    ghost_p: float = 0.003  # share of windows with one implausibly fast radar target
    radar_outage_days: float = 20
    loop_outage_days: float = 30
    weather_outage_days: float = 40
    luminaire_failure_days: float = 12
    lights_fault_day_p: float = 0.01  # per day: lights dark all night or lit all day
    extra_load_days: float = 30  # unexplained 0.4-0.9 kW loads
    meter_spike_days: float = 10
    meter_outage_days: float = 25


@dataclass(frozen=True)
class SiteParams:
    """One simulated site over ``days`` from ``start`` (local midnight), on ``window_s`` windows.

    The defaults are the training site, ``berlin-street``.
    """

    name: str = "berlin-street"
    about: str = "urban street, 50 km/h, one lane each way, Berlin; the training site"
    days: int = 365
    seed: int = 7
    start: str = "2025-01-01"
    timezone: str = "Europe/Berlin"
    lat_deg: float = 52.5
    lon_deg: float = 13.4
    window_s: int = 300
    road: Road = field(default_factory=Road)
    demand: Demand = field(default_factory=Demand)
    climate: Climate = field(default_factory=Climate)
    cabinet: Cabinet = field(default_factory=Cabinet)
    faults: Faults = field(default_factory=Faults)


BERLIN_STREET = SiteParams()

CHICAGO_ARTERIAL = SiteParams(
    name="chicago-arterial",
    about="arterial, 60 km/h, two lanes each way, more demand, four chargers, Chicago",
    timezone="America/Chicago", lat_deg=41.88, lon_deg=-87.63,
    road=Road(free_flow_m_s=16.7, lanes=2),
    demand=Demand(level=2.3, am_peak_h=7.5, pm_peak_h=17.0, friday_pm_peak_h=16.0,
                  day_veh_h=600.0),
    climate=Climate(mean_c=10.5, season_c=13.5, coldest_doy=22.0, rain_every_h=40.0),
    cabinet=Cabinet(luminaires=30, luminaire_w=110.0, chargers_kw=(11.0, 11.0, 7.4, 7.4),
                    ev_arrivals=2.0, base_w=70.0),
)

SEVILLE_SUBURB = SiteParams(
    name="seville-suburb",
    about="southern suburb, 40 km/h, low demand, 40 luminaires, one charger, Seville",
    timezone="Europe/Madrid", lat_deg=37.39, lon_deg=-5.98,
    road=Road(free_flow_m_s=11.1),
    demand=Demand(level=0.55, am_peak_h=8.25, pm_peak_h=18.5, friday_pm_peak_h=17.0,
                  day_end_h=22.0, day_start_h=7.0),
    climate=Climate(mean_c=19.0, season_c=8.0, coldest_doy=15.0, rain_every_h=120.0),
    cabinet=Cabinet(luminaires=40, luminaire_w=35.0, chargers_kw=(7.4,), ev_arrivals=0.5,
                    base_w=50.0),
)

HELDOUT_RING = SiteParams(
    name="heldout-ring",
    about=("HELD OUT: ring road, 70 km/h, three lanes each way, Osaka. Its parameters were "
           "fixed once, before any model was run on it, and it is never used for a design or "
           "tuning decision: it only fills its row of the site-transfer table."),
    timezone="Asia/Tokyo", lat_deg=34.69, lon_deg=135.50,
    road=Road(free_flow_m_s=19.4, lanes=3),
    demand=Demand(level=3.4, am_peak_h=8.0, pm_peak_h=18.3, friday_pm_peak_h=17.5,
                  am_in_veh_h=900.0, pm_out_veh_h=900.0, day_veh_h=570.0, day_end_h=21.5,
                  saturday_veh_h=680.0, sunday_veh_h=430.0, night_veh_h=45.0),
    climate=Climate(mean_c=16.5, season_c=10.5, coldest_doy=20.0, rain_every_h=30.0,
                    rain_spell_h=4.0),
    cabinet=Cabinet(luminaires=48, luminaire_w=90.0, chargers_kw=(22.0, 22.0, 11.0),
                    ev_arrivals=1.6, base_w=90.0),
    faults=Faults(incident_days=7, ghost_p=0.005, radar_outage_days=15, loop_outage_days=20,
                  meter_spike_days=8),
)

PRESETS: dict[str, SiteParams] = {
    p.name: p for p in (BERLIN_STREET, CHICAGO_ARTERIAL, SEVILLE_SUBURB, HELDOUT_RING)
}
HELDOUT = ("heldout-ring",)


class UnknownPreset(KeyError):
    """A preset name that is not in ``PRESETS``."""


def preset(name: str, **overrides: Any) -> SiteParams:
    """A named preset, optionally with top-level fields replaced (days, seed, start ...)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise UnknownPreset(f"unknown site preset {name!r}; known: {', '.join(PRESETS)}") from None
    return replace(base, **overrides) if overrides else base
