"""Each typed detector on hand-built windows: one event per fault, closed once it clears."""

from __future__ import annotations

import json
import random

import pytest

from agent.anomaly import AnomalyEvent, AnomalyMonitor, Sample, Thresholds, topic
from agent.anomaly.events import Latch
from agent.anomaly.thresholds import (
    DriftThresholds,
    LampThresholds,
    SpikeThresholds,
    StuckThresholds,
    UnexplainedThresholds,
)

S = 1_000_000_000
T0 = 1_767_225_600  # 2026-01-01T00:00Z
BASE_W = 100.0


def thresholds() -> Thresholds:
    return Thresholds(
        stuck=StuckThresholds(frozen_windows=4, zero_w=20.0, clear_windows=3),
        spike=SpikeThresholds(rel=0.3, floor_w=100.0, ref_rel=0.15),
        drift=DriftThresholds(bias=0.0, rel=0.012, clear_rel=0.007, span_windows=15,
                              min_load_w=30.0, clear_windows=5),
        lamps=LampThresholds(profile_w=[1000.0] * 48, dark_ratio=0.8, lit_w=100.0,
                             el_on_deg=-4.0, el_off_deg=2.0, dawn_margin_deg=90.0,
                             confirm_windows=3,
                             clear_windows=3),
        unexplained=UnexplainedThresholds(limit_w=[300.0] * 24, main_gains=[1.0, 1.0, 1.0],
                                          check_gains=[1.0, 1.0, 1.0], load_allowance=0.003,
                                          confirm_windows=3,
                                          clear_windows=3),
        window_s=60, calibrated_days=14.0, target_false_alarms_per_30d=1.0,
    )


class Cabinet:
    """A quiet cabinet: base load, lights per photocell, two charge points, noisy meters."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.i = 0

    def sample(self, *, night: bool = True, lights: float | None = None,
               chargers: tuple[float, float] = (0.0, 0.0), extra: float = 0.0,
               main: float | None = None, check: float | None = None,
               photocell: float | None = None, el: float | None = None) -> Sample:
        lit = (1000.0 if night else 0.0) if lights is None else lights
        true = BASE_W + lit + sum(chargers) + extra
        noisy = lambda: round(true * (1 + self.rng.gauss(0, 0.001)) + self.rng.gauss(0, 0.3), 2)  # noqa: E731
        t = T0 + 60 * self.i
        self.i += 1
        return Sample(
            start_ns=t * S, end_ns=(t + 60) * S,
            main_w=noisy() if main is None else main,
            check_w=noisy() if check is None else check,
            lights_w=lit, chargers_w=chargers,
            photocell=(1.0 if night else 0.0) if photocell is None else photocell,
            elevation_deg=(-10.0 if night else 20.0) if el is None else el,
            local_hour=1.0 if night else 12.0,
        )


def run(mon: AnomalyMonitor, samples: list[Sample]) -> list[AnomalyEvent]:
    return [ev for s in samples for ev in mon.update(s)]


def one_episode(events: list[AnomalyEvent], type_: str) -> tuple[AnomalyEvent, AnomalyEvent]:
    """The open and the close of exactly one event of ``type_``, and nothing else."""
    assert [e.type for e in events] == [type_, type_], events
    opened, closed = events
    assert opened.end_ns is None and closed.end_ns is not None
    assert opened.event_id == closed.event_id
    return opened, closed


@pytest.fixture
def mon() -> AnomalyMonitor:
    return AnomalyMonitor("energy", thresholds())


def test_clean_night_and_day_raise_nothing(mon: AnomalyMonitor) -> None:
    cab = Cabinet()
    quiet = [cab.sample(night=n) for n in [True] * 200 + [False] * 200]
    assert run(mon, quiet) == []
    assert mon.open_events() == []


def test_charger_start_is_not_unexplained_load(mon: AnomalyMonitor) -> None:
    # 11 kW on a metered charge point: the feed jumps, the residual does not.
    cab = Cabinet()
    samples = [cab.sample() for _ in range(30)]
    samples += [cab.sample(chargers=(11_000.0, 7_400.0)) for _ in range(60)]
    assert run(mon, samples) == []


def test_unmetered_load_opens_one_event_until_it_stops(mon: AnomalyMonitor) -> None:
    cab = Cabinet()
    samples = [cab.sample() for _ in range(30)]
    samples += [cab.sample(extra=600.0, chargers=(7_400.0, 0.0)) for _ in range(120)]
    samples += [cab.sample() for _ in range(30)]
    opened, closed = one_episode(run(mon, samples), "unexplained_load")
    assert opened.start_ns == samples[30].start_ns
    assert opened.detected_ns == samples[32].end_ns  # three windows confirm it
    assert closed.end_ns == samples[149].end_ns
    # Over the hour's limit, which rises with the 8.4 kW metered on the circuits.
    excess = 600.0 + BASE_W - (300.0 + 0.003 * 8_400.0)
    assert opened.evidence["excess_w"] == pytest.approx(excess, abs=20.0)


@pytest.mark.parametrize("mode", ["frozen", "zero"])
def test_stuck_meter_opens_once_and_clears(mon: AnomalyMonitor, mode: str) -> None:
    cab = Cabinet()
    samples = [cab.sample() for _ in range(20)]
    held = samples[-1].main_w if mode == "frozen" else 0.0
    samples += [cab.sample(main=held, chargers=(0.0, 3_700.0 * (k > 30))) for k in range(90)]
    samples += [cab.sample() for _ in range(30)]
    opened, closed = one_episode(run(mon, samples), "meter_stuck")
    assert opened.channel == "main" and opened.evidence["mode"] == mode
    assert opened.severity == "critical"
    assert closed.end_ns == samples[109].end_ns


def test_spike_is_one_closed_event(mon: AnomalyMonitor) -> None:
    cab = Cabinet()
    samples = [cab.sample() for _ in range(20)]
    samples.append(cab.sample(main=3 * (BASE_W + 1000.0) + 500.0))
    samples += [cab.sample() for _ in range(20)]
    events = run(mon, samples)
    assert [(e.type, e.channel) for e in events] == [("meter_spike", "main")]
    ev = events[0]
    assert ev.start_ns == samples[20].start_ns and ev.end_ns == samples[20].end_ns
    assert ev.detected_ns == samples[21].end_ns


def test_load_step_between_meters_is_not_a_spike(mon: AnomalyMonitor) -> None:
    # The check meter polled later sees a charger start one window later: both rise.
    cab = Cabinet()
    samples = [cab.sample() for _ in range(20)]
    samples.append(cab.sample(chargers=(11_000.0, 0.0), check=BASE_W + 1000.0 + 2000.0))
    samples += [cab.sample(chargers=(11_000.0, 0.0)) for _ in range(20)]
    assert run(mon, samples) == []


def test_drift_opens_once_and_clears_after_repair(mon: AnomalyMonitor) -> None:
    cab = Cabinet()
    samples = [cab.sample() for _ in range(30)]
    for k in range(200):
        s = cab.sample()
        samples.append(Sample(s.start_ns, s.end_ns, s.main_w * (1 + min(k / 60, 1) * 0.06),
                              s.check_w, s.lights_w, s.chargers_w, s.photocell,
                              s.elevation_deg, s.local_hour))
    samples += [cab.sample() for _ in range(60)]
    opened, closed = one_episode(run(mon, samples), "meter_drift")
    assert opened.evidence["deviation_pct"] > 1.2
    assert closed.end_ns is not None and closed.end_ns > samples[229].start_ns


@pytest.mark.parametrize(("night", "lights", "photocell", "el", "type_"), [
    (True, 1000.0 / 3, 1.0, -10.0, "lamps_dark"),  # a third of the lamps lit
    (True, 0.0, 0.0, -10.0, "lamps_dark"),  # photocell stuck on "day" after dusk
    (False, 1000.0, 0.0, 20.0, "lamps_lit"),  # contactor welded
    (False, 1000.0, 1.0, 20.0, "lamps_lit"),  # photocell stuck on "night"
])
def test_lamp_fault_opens_once_and_clears(mon: AnomalyMonitor, night: bool, lights: float,
                                          photocell: float, el: float, type_: str) -> None:
    cab = Cabinet()
    samples = [cab.sample(night=night) for _ in range(20)]
    samples += [cab.sample(night=night, lights=lights, photocell=photocell, el=el)
                for _ in range(60)]
    samples += [cab.sample(night=night) for _ in range(20)]
    opened, closed = one_episode(run(mon, samples), type_)
    assert opened.detected_ns == samples[22].end_ns
    assert closed.end_ns == samples[79].end_ns


def test_photocell_is_trusted_in_twilight(mon: AnomalyMonitor) -> None:
    # Between the two sun limits a photocell that has not switched yet is no fault.
    cab = Cabinet()
    samples = [cab.sample(night=False, el=-1.0) for _ in range(60)]
    samples += [cab.sample(night=True, el=-3.0) for _ in range(60)]
    assert run(mon, samples) == []


def dawn_with_a_stuck_photocell(cab: Cabinet, dusk_el: float | None) -> list[Sample]:
    """An evening whose photocell switched on at ``dusk_el`` (None: no dusk seen), a night,
    then a dawn from -3 to +3 degrees, 0.1 a window, with the photocell stuck on "night"."""
    samples = []
    if dusk_el is not None:
        samples += [cab.sample(night=False, el=dusk_el + 0.5) for _ in range(5)]
        samples += [cab.sample(night=True, el=dusk_el) for _ in range(5)]
    samples += [cab.sample(night=True, el=-10.0) for _ in range(30)]
    samples += [cab.sample(night=True, el=-3.0 + 0.1 * k) for k in range(61)]
    return samples


@pytest.mark.parametrize(("margin", "dusk_el", "opens_above"), [
    (1.5, -2.5, -1.0),  # this night's dusk + margin comes before the site-wide el_off (2.0)
    (1.5, None, 2.0),  # no dusk switch seen: the site-wide bound
    (1.5, 1.0, 2.0),  # the site-wide bound is the tighter one
    (90.0, -2.5, 2.0),  # a version-1 file: no dawn bound
])
def test_dawn_bound_follows_this_nights_dusk(margin: float, dusk_el: float | None,
                                             opens_above: float) -> None:
    th = thresholds()
    th = Thresholds.from_json(th.to_json().replace('"dawn_margin_deg": 90.0',
                                                   f'"dawn_margin_deg": {margin}'))
    assert th.lamps.dawn_margin_deg == margin
    samples = dawn_with_a_stuck_photocell(Cabinet(), dusk_el)
    events: list[tuple[Sample, AnomalyEvent]] = []
    mon = AnomalyMonitor("energy", th)
    for s in samples:
        events += [(s, e) for e in mon.update(s) if e.type == "lamps_lit"]
    assert len(events) == 1, events
    s, ev = events[0]
    # Opened after confirm_windows (3) windows above the bound, 0.1 degree each.
    assert opens_above + 0.2 < s.elevation_deg < opens_above + 0.45
    assert ev.evidence["photocell"] == 1.0


def test_version_1_thresholds_keep_their_behaviour() -> None:
    raw = json.loads(thresholds().to_json())
    raw["version"] = 1
    del raw["lamps"]["dawn_margin_deg"]
    th = Thresholds.from_json(json.dumps(raw))
    assert th.lamps.dawn_margin_deg == 90.0
    raw["version"] = 3
    with pytest.raises(ValueError, match="version"):
        Thresholds.from_json(json.dumps(raw))


def test_latch_ignores_windows_it_cannot_judge() -> None:
    latch = Latch(3, 2)
    seq: list[bool | None] = [True, None, True, True, False, None, False]
    out = [latch.update(c, i, i + 1) for i, c in enumerate(seq)]
    assert out == [None, None, None, "open", None, None, "close"]
    assert latch.first_true_ns == 0 and latch.last_true_end_ns == 4


def test_event_message_and_topic() -> None:
    ev = AnomalyEvent("lamps_dark", "energy", "lights", T0 * S, (T0 + 180) * S, "warning",
                      {"lights_w": 330.0})
    msg = ev.to_message()
    assert msg["start"] == "2026-01-01T00:00:00Z" and msg["end"] is None
    assert set(msg) == {"schema", "event_id", "type", "stream", "channel", "start", "detected",
                        "end", "severity", "evidence"}
    assert json.loads(json.dumps(ev.closed((T0 + 600) * S).to_message()))["end"] == \
        "2026-01-01T00:10:00Z"
    assert topic("city", "cabinet-0042", "energy") == "city/cabinet-0042/anomaly/energy"


def test_thresholds_round_trip_and_reject_unknown_keys() -> None:
    th = thresholds()
    assert Thresholds.from_json(th.to_json()) == th
    raw = json.loads(th.to_json())
    raw["lamps"]["dark_ratoi"] = 0.5
    with pytest.raises(ValueError, match="dark_ratoi"):
        Thresholds.from_json(json.dumps(raw))


def test_on_window_reads_the_roles_from_a_stream_window() -> None:
    from agent.anomaly import ChannelMap, SiteInfo, sample_from_window
    from agent.readings import ChannelStats, Window

    def st(v: float) -> ChannelStats:
        return ChannelStats(12, v, v, v, v, 0.0, "W")

    channels = ChannelMap(main="feed.active_power", check="utility.active_power",
                          lights="lights.active_power",
                          chargers=("cp1.active_power", "cp2.active_power"),
                          photocell="dio.photocell")
    site = SiteInfo(52.5, 13.4, "Europe/Berlin")
    w = Window("energy", T0 * S, (T0 + 60) * S, {
        "feed.active_power": st(1200.0), "utility.active_power": st(1201.0),
        "lights.active_power": st(1000.0), "cp1.active_power": st(0.0),
        "dio.photocell": ChannelStats(12, 1.0, 1.0, 1.0, 1.0, 0.0, "1"),
    })
    s = sample_from_window(w, channels, site)
    assert (s.main_w, s.check_w, s.lights_w, s.photocell) == (1200.0, 1201.0, 1000.0, 1.0)
    assert s.chargers_w[0] == 0.0 and s.chargers_w[1] != s.chargers_w[1]  # no data: NaN
    assert s.local_hour == pytest.approx(1.0 + 0.5 / 60)  # 01:00:30 CET
    assert s.elevation_deg < -50.0  # Berlin at 1 a.m. in January
    assert AnomalyMonitor("energy", thresholds()).on_window(w, channels, site) == []
