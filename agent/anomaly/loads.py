"""Detectors for what the circuits draw: street lights and load nobody accounts for.

Lights: the photocell says whether lamps should be lit, the sun overrules it when it is clearly
up or clearly down (a photocell stuck either way is itself the fault). Lit power is compared
with the site's learned profile by local half hour, which carries any dimming schedule, times a
slowly tracked scale, so a luminaire failing now and then moves the baseline, not the alarm.

Unexplained load: the feed meter minus every metered circuit (lights, each charge point) is
the cabinet's own load; above the learned limit for the hour on both feed meters, it is a load
nobody metered. Subtracting the charge points is what keeps a car starting to charge from
looking like a fault.
"""

from __future__ import annotations

import math

from agent.anomaly.events import AnomalyEvent, Evidence, Latch, Severity
from agent.anomaly.meters import Episode
from agent.anomaly.sample import Sample
from agent.anomaly.thresholds import LampThresholds, UnexplainedThresholds

# Time constant of the lit-power scale, in lit windows: slow against a fault that must be
# confirmed within minutes, fast against luminaires failing one by one over weeks.
SCALE_WINDOWS = 240.0
SCALE_MIN = 0.3
DUSK_MEMORY_NS = 20 * 3600 * 1_000_000_000


def profile_bin(local_hour: float, bins: int) -> int:
    return int(local_hour * bins / 24.0) % bins


def expected_lit(s: Sample, th: LampThresholds, dusk_el: float = math.nan) -> bool | None:
    """Whether the lamps should be on in this window; None while switching or unknown.

    ``dusk_el``: the elevation at which the photocell switched on this night, if it did; the
    same photocell switches off near it at dawn, so past it by the calibrated margin, the sun
    is up for this photocell, before the site-wide bound says so.
    """
    if s.elevation_deg < th.el_on_deg:
        return True
    off = th.el_off_deg
    if not math.isnan(dusk_el):
        off = min(off, dusk_el + th.dawn_margin_deg)
    if s.elevation_deg > off:
        return False
    p = s.photocell
    if math.isnan(p) or 0.0 < p < 1.0:
        return None
    return p >= 0.5


class LampDetector:
    def __init__(self, stream: str, th: LampThresholds) -> None:
        self.th = th
        self.dark = Episode("lamps_dark", stream, "lights",
                            Latch(th.confirm_windows, th.clear_windows))
        self.lit = Episode("lamps_lit", stream, "lights",
                           Latch(th.confirm_windows, th.clear_windows))
        self.scale = 1.0
        self._prev_expected: bool | None = None
        self._prev_photocell = math.nan
        self._dusk_el = math.nan
        self._dusk_ns = 0

    def _track_dusk(self, s: Sample) -> None:
        """Remember where the photocell switched on this evening; forget it at its next switch
        off, or after 20 h (a photocell that never switched off has no dusk to go by)."""
        p, prev = s.photocell, self._prev_photocell
        self._prev_photocell = p
        if s.start_ns - self._dusk_ns > DUSK_MEMORY_NS:
            self._dusk_el = math.nan
        if math.isnan(p) or math.isnan(prev):
            return
        if prev < 0.5 <= p and s.elevation_deg < self.th.el_off_deg:
            self._dusk_el, self._dusk_ns = s.elevation_deg, s.start_ns
        elif p < 0.5 <= prev:
            self._dusk_el = math.nan

    def update(self, s: Sample) -> list[AnomalyEvent]:
        dusk_el = self._dusk_el  # this window's own switch-off must not clear it first
        self._track_dusk(s)
        should = expected_lit(s, self.th, dusk_el)
        settled = should is not None and should == self._prev_expected
        self._prev_expected = should
        w = s.lights_w
        if not settled or math.isnan(w):
            return []  # a lamp switching, or no reading: neither confirms nor clears
        profile = self.th.profile_w[profile_bin(s.local_hour, len(self.th.profile_w))]
        expected = profile * self.scale
        ratio = w / expected if expected > 0 else math.nan
        dark = bool(should) and ratio < self.th.dark_ratio
        lit = not should and w > self.th.lit_w
        if should and not dark and not math.isnan(ratio):
            self.scale += (min(ratio, 1.5) - self.scale) / SCALE_WINDOWS
            self.scale = max(self.scale, SCALE_MIN)
        evidence: Evidence = {
            "lights_w": w, "expected_w": expected if should else 0.0,
            "photocell": s.photocell, "sun_elevation_deg": round(s.elevation_deg, 2),
        }
        if should:
            evidence["lit_fraction"] = ratio
        sev_dark: Severity = "critical" if ratio < 0.4 else "warning"
        out = []
        for ep, cond, sev in ((self.dark, dark, sev_dark), (self.lit, lit, "warning")):
            ev = ep.step(cond, s, sev, evidence)
            if ev is not None:
                out.append(ev)
        return out


def residual(feed: float, s: Sample, gains: list[float]) -> float:
    """Feed power minus every metered circuit; NaN if any of them is missing."""
    total = gains[0] * s.lights_w
    for g, c in zip(gains[1:], s.chargers_w, strict=True):
        total += g * c
    return feed - total


class UnexplainedLoadDetector:
    def __init__(self, stream: str, th: UnexplainedThresholds) -> None:
        self.th = th
        self.ep = Episode("unexplained_load", stream, "feed",
                          Latch(th.confirm_windows, th.clear_windows))

    def update(self, s: Sample, use_main: bool = True,
               use_check: bool = True) -> AnomalyEvent | None:
        # A real load shows on both feed meters; a meter fault (drift, frozen) on one only, so
        # the smaller residual is the one to trust.
        parts = []
        if use_main:
            parts.append(residual(s.main_w, s, self.th.main_gains))
        if use_check:
            parts.append(residual(s.check_w, s, self.th.check_gains))
        parts = [p for p in parts if not math.isnan(p)]
        if not parts:
            return None
        r = min(parts)
        metered = s.lights_w + sum(s.chargers_w)
        limit = self.th.limit_w[profile_bin(s.local_hour, len(self.th.limit_w))]
        limit += self.th.load_allowance * metered
        excess = r - limit
        severity: Severity = "critical" if excess > 1000.0 else "warning"
        evidence: Evidence = {"residual_w": r, "limit_w": limit, "excess_w": excess,
                              "chargers_w": metered - s.lights_w, "lights_w": s.lights_w}
        return self.ep.step(r > limit, s, severity, evidence)
