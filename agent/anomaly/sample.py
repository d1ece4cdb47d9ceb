"""What the detectors see of one energy window: the circuits of one cabinet, by role.

A cabinet's meters are named in the config (``ChannelMap``): the total feed meter, optionally a
redundant check meter on the same feed, the lighting circuit, each separately metered charge
point, and the photocell input. ``sample_from_window`` reads those roles out of a stream
window; simulations build ``Sample`` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from agent.anomaly.solar import solar_elevation_deg
from agent.readings import Window

NAN = math.nan


@dataclass(frozen=True, slots=True)
class Sample:
    """Window means (W) per circuit; NaN where a meter gave nothing in the window."""

    start_ns: int
    end_ns: int
    main_w: float
    check_w: float  # NaN when the cabinet has no check meter
    lights_w: float
    chargers_w: tuple[float, ...]
    photocell: float  # fraction of the window the photocell called for light, 0..1; NaN if none
    elevation_deg: float
    local_hour: float  # local wall-clock hour 0..24, for daily profiles and dimming schedules


@dataclass(frozen=True, slots=True)
class SiteInfo:
    lat_deg: float
    lon_deg: float
    timezone: str


@dataclass(frozen=True, slots=True)
class ChannelMap:
    """Window channel names (``sensor.quantity``) for each role."""

    main: str
    lights: str
    check: str | None = None
    chargers: tuple[str, ...] = ()
    photocell: str | None = None


def local_hour(ts_s: float, zone: ZoneInfo) -> float:
    t = datetime.fromtimestamp(ts_s, tz=zone)
    return t.hour + t.minute / 60.0 + t.second / 3600.0


def sample_from_window(window: Window, channels: ChannelMap, site: SiteInfo) -> Sample:
    """The detectors' view of ``window``; elevation and local time at the window's middle."""

    def mean(name: str | None) -> float:
        if name is None:
            return NAN
        st = window.channels.get(name)
        return st.mean if st is not None and st.count else NAN

    mid_s = (window.start_ns + window.end_ns) / 2e9
    return Sample(
        start_ns=window.start_ns,
        end_ns=window.end_ns,
        main_w=mean(channels.main),
        check_w=mean(channels.check),
        lights_w=mean(channels.lights),
        chargers_w=tuple(mean(c) for c in channels.chargers),
        photocell=mean(channels.photocell),
        elevation_deg=solar_elevation_deg(mid_s, site.lat_deg, site.lon_deg),
        local_hour=local_hour(mid_s, ZoneInfo(site.timezone)),
    )
