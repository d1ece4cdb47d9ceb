"""Typed anomaly detectors on simulated cabinets: calibrate on 14 days, score held-out weeks.

    python -m models.anomaly_eval [--weeks 8] [--cabinets 3] [--json]
    python -m models.anomaly_eval --calibrate HISTORY.csv --lat .. --lon .. --tz .. --out F

The second form calibrates a real site from its exported history (``models.anomaly_csv``).

For each site (``models.anomaly_sim.SITES``, the presets of ``models.sites``) and each cabinet
(a seed), the first 14 days calibrate the thresholds (``agent.anomaly.calibrate``, with the
cabinet's heater and fan declared). Those days carry faults at the normal rate, as a real
history would (``--fault-free-history``: none); no fault spans their end, and only the faults
after it are scored. The following weeks carry injected faults of every type and are
streamed window by window through ``agent.anomaly.AnomalyMonitor``. The same weeks without
their faults (the cabinet's clean twin, same loads and noise) are streamed too.

Event-level scoring, per fault type, pooled over a site's cabinets:

- an event *matches* a labelled fault of its own type when their intervals overlap (an event
  still open at the end of the run is closed there);
- precision = matching events / events of that type; recall = labelled faults with at least
  one matching event / labelled faults; F1 from the two;
- detection delay of a found fault = the ``detected`` time of its first matching event minus
  the labelled start (0 if the detector was earlier); the table gives the 90th percentile;
- a *false alarm* is an event overlapping no labelled fault of any type (an event of the wrong
  type during another fault costs precision, not this count). False alarms per cabinet per 30
  days of normal operation = false alarms / (cabinet-days outside labelled faults) x 30;
  ``clean FA`` is the same over the clean twins, where every event is false.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.anomaly import EVENT_TYPES, AnomalyEvent, AnomalyMonitor, SiteInfo
from agent.anomaly.calibrate import calibrate
from agent.anomaly.thresholds import Thresholds
from models.anomaly_csv import HistoryCsvError, calibrate_from_csv
from models.anomaly_sim import DAY_S, SITES, CabinetRun, CabinetSite, Fault, simulate_cabinet

CALIBRATION_DAYS = 14.0
NS = 1_000_000_000
TARGET_F1 = 0.9
TARGET_P90_DELAY_MIN = 15.0
TARGET_FA_PER_30D = 1.0


@dataclass(frozen=True)
class Span:
    type: str
    start_s: float
    end_s: float
    detected_s: float
    channel: str


@dataclass
class TypeScore:
    events: int = 0
    matched_events: int = 0
    faults: int = 0
    found: int = 0
    false_alarms: int = 0
    delays_s: list[float] = field(default_factory=list)
    by_mechanism: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class SiteScore:
    site: str
    cabinets: int = 0
    history_faults: int = 0  # labelled faults inside the calibration histories
    normal_days: float = 0.0
    clean_days: float = 0.0
    clean_events: int = 0
    by_type: dict[str, TypeScore] = field(default_factory=lambda: {t: TypeScore()
                                                                   for t in EVENT_TYPES})
    thresholds: list[Thresholds] = field(default_factory=list)


def run_monitor(run: CabinetRun, th: Thresholds, from_day: float) -> list[Span]:
    """Stream the run from ``from_day`` and return every event, open ones closed at the end."""
    mon = AnomalyMonitor("energy", th)
    closed: list[AnomalyEvent] = []
    samples = run.samples(from_day)
    for s in samples:
        closed.extend(e for e in mon.update(s) if e.end_ns is not None)
    end = samples[-1].end_ns if samples else 0
    closed.extend(e.closed(end) for e in mon.open_events())
    return [Span(e.type, e.start_ns / NS, (e.end_ns or end) / NS, e.detected_ns / NS, e.channel)
            for e in closed]


def _overlaps(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 < b1 and b0 < a1


def score_cabinet(score: SiteScore, events: Iterable[Span], faults: list[Fault],
                  t0: float, t1: float) -> None:
    events = list(events)
    for t, ts in score.by_type.items():
        labels = [f for f in faults if f.type == t]
        mine = [e for e in events if e.type == t]
        ts.events += len(mine)
        ts.faults += len(labels)
        ts.matched_events += sum(any(_overlaps(e.start_s, e.end_s, f.start_s, f.end_s)
                                     for f in labels) for e in mine)
        for f in labels:
            hits = [e for e in mine if _overlaps(e.start_s, e.end_s, f.start_s, f.end_s)]
            if hits:
                ts.found += 1
                delay = max(0.0, min(e.detected_s for e in hits) - f.start_s)
                ts.delays_s.append(delay)
                if f.mechanism:
                    ts.by_mechanism.setdefault(f.mechanism, []).append(delay)
        ts.false_alarms += sum(not any(_overlaps(e.start_s, e.end_s, f.start_s, f.end_s)
                                       for f in faults) for e in mine)
    faulty = sum(f.end_s - f.start_s for f in faults)  # faults never overlap (the scheduler)
    score.normal_days += (t1 - t0 - faulty) / DAY_S


def evaluate_site(site: CabinetSite, weeks: float, cabinets: int,
                  clean: bool = True, history_faults: bool = True) -> SiteScore:
    score = SiteScore(site.name)
    days = CALIBRATION_DAYS + 7 * weeks
    free = 0.0 if history_faults else CALIBRATION_DAYS
    for k in range(cabinets):
        seed = site.seed + 1000 * k
        run = simulate_cabinet(site, days, fault_free_days=free, seed=seed,
                               split_days=CALIBRATION_DAYS)
        t0 = float(run.ts_s[0]) + CALIBRATION_DAYS * DAY_S
        score.history_faults += sum(f.start_s < t0 for f in run.faults)
        th = calibrate(run.history(CALIBRATION_DAYS), TARGET_FA_PER_30D,
                       declared_w=site.heater_w + site.fan_w)
        score.thresholds.append(th)
        t1 = float(run.ts_s[-1]) + 60.0
        scored = [f for f in run.faults if f.start_s >= t0]
        score_cabinet(score, run_monitor(run, th, CALIBRATION_DAYS), scored, t0, t1)
        if clean:
            twin = simulate_cabinet(site, days, fault_free_days=free, seed=seed,
                                    with_faults=False, split_days=CALIBRATION_DAYS)
            score.clean_events += len(run_monitor(twin, th, CALIBRATION_DAYS))
            score.clean_days += (t1 - t0) / DAY_S
        score.cabinets += 1
    return score


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summary(score: SiteScore) -> dict[str, object]:
    rows: dict[str, dict[str, object]] = {}
    for t, ts in score.by_type.items():
        p = _ratio(ts.matched_events, ts.events) if ts.events else 1.0
        r = _ratio(ts.found, ts.faults)
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        delay = float(np.percentile(ts.delays_s, 90)) / 60.0 if ts.delays_s else float("nan")
        p50 = float(np.percentile(ts.delays_s, 50)) / 60.0 if ts.delays_s else float("nan")
        rows[t] = {
            "faults": ts.faults, "events": ts.events, "precision": p, "recall": r, "f1": f1,
            "p50_delay_min": p50, "p90_delay_min": delay,
            "false_alarms_per_30d": ts.false_alarms / max(score.normal_days, 1e-9) * 30.0,
        }
        if ts.by_mechanism:
            rows[t]["p90_delay_min_by_mechanism"] = {
                m: {"found": len(d), "p90_delay_min": float(np.percentile(d, 90)) / 60.0}
                for m, d in sorted(ts.by_mechanism.items())}
    fa = sum(ts.false_alarms for ts in score.by_type.values())
    out: dict[str, object] = {
        "site": score.site, "cabinets": score.cabinets,
        "calibration_days": CALIBRATION_DAYS, "history_faults": score.history_faults,
        "normal_cabinet_days": round(score.normal_days, 2),
        "false_alarms": fa,
        "false_alarms_per_30d": fa / max(score.normal_days, 1e-9) * 30.0,
        "types": rows,
    }
    if score.clean_days:
        out["clean_events"] = score.clean_events
        out["clean_false_alarms_per_30d"] = score.clean_events / score.clean_days * 30.0
    out["meets_targets"] = meets_targets(out)
    return out


def meets_targets(s: dict[str, object]) -> bool:
    rows = s["types"]
    assert isinstance(rows, dict)
    ok = all(r["f1"] >= TARGET_F1 and r["p90_delay_min"] <= TARGET_P90_DELAY_MIN
             for r in rows.values())
    fa = float(s["false_alarms_per_30d"])  # type: ignore[arg-type]
    clean = float(s.get("clean_false_alarms_per_30d", 0.0))  # type: ignore[arg-type]
    return ok and fa <= TARGET_FA_PER_30D and clean <= TARGET_FA_PER_30D


def format_table(s: dict[str, object]) -> str:
    rows = s["types"]
    assert isinstance(rows, dict)
    lines = [
        f"site {s['site']}: {s['cabinets']} cabinets, {s['normal_cabinet_days']} cabinet-days "
        f"of normal operation; false alarms {s['false_alarms']} = "
        f"{s['false_alarms_per_30d']:.2f} per cabinet per 30 days"
        + (f"; clean twins {s['clean_events']} events = "
           f"{s['clean_false_alarms_per_30d']:.2f} per 30 days" if "clean_events" in s else ""),
        f"{'type':<17} {'faults':>6} {'events':>6} {'prec':>6} {'recall':>6} {'F1':>6} "
        f"{'p50 delay':>9} {'p90 delay min':>13} {'FA/30d':>7}",
    ]
    for t, r in rows.items():
        lines.append(f"{t:<17} {r['faults']:>6} {r['events']:>6} {r['precision']:>6.3f} "
                     f"{r['recall']:>6.3f} {r['f1']:>6.3f} {r['p50_delay_min']:>9.1f} "
                     f"{r['p90_delay_min']:>13.1f} "
                     f"{r['false_alarms_per_30d']:>7.2f}")
        for m, d in r.get("p90_delay_min_by_mechanism", {}).items():
            lines.append(f"  {m:<15} {d['found']:>6} found {'':>37} "
                         f"{d['p90_delay_min']:>13.1f}")
    lines.append(f"meets targets: {s['meets_targets']}")
    return "\n".join(lines)


def calibrate_cli(args: argparse.Namespace) -> int:
    """``--calibrate CSV``: thresholds for a real site from its exported history."""
    if args.lat is None or args.lon is None or not args.tz:
        print("--calibrate needs --lat, --lon and --tz (the lamp checks follow the sun)",
              file=sys.stderr)
        return 2
    site = SiteInfo(args.lat, args.lon, args.tz)
    try:
        th = calibrate_from_csv(args.calibrate, site, window_s=args.window_s, days=args.days,
                                declared_w=args.declared_w)
    except HistoryCsvError as exc:
        print(f"cannot calibrate: {exc}", file=sys.stderr)
        return 2
    text = th.to_json()
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.json or args.out is None:
        print(text)
    else:
        print(f"wrote {args.out}: {th.calibrated_days:g} days of {th.window_s} s windows, "
              f"{len(th.unexplained.main_gains) - 1} charge points")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.anomaly_eval",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--weeks", type=float, default=8.0, help="held-out weeks per cabinet")
    ap.add_argument("--cabinets", type=int, default=3, help="cabinets (seeds) per site")
    ap.add_argument("--site", choices=sorted(SITES), action="append",
                    help="evaluate only this site (repeatable)")
    ap.add_argument("--no-clean", action="store_true", help="skip the clean-twin runs")
    ap.add_argument("--fault-free-history", action="store_true",
                    help="no faults in the 14 calibration days")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--write-thresholds", metavar="DIR", type=Path,
                    help="write each site's first cabinet's calibrated thresholds to DIR/SITE.json")
    cal = ap.add_argument_group("site calibration (instead of the evaluation)")
    cal.add_argument("--calibrate", metavar="CSV", type=Path,
                     help="write thresholds from this exported history (models.anomaly_csv)")
    cal.add_argument("--lat", type=float, help="site latitude, degrees north")
    cal.add_argument("--lon", type=float, help="site longitude, degrees east")
    cal.add_argument("--tz", default="", help="site time zone (IANA name)")
    cal.add_argument("--days", type=float, default=14.0,
                     help="use the first DAYS of the history (default 14)")
    cal.add_argument("--window-s", type=int, default=60, help="energy window length (60)")
    cal.add_argument("--declared-w", type=float, default=0.0,
                     help="nameplate W of the cabinet's heater and fan (default 0)")
    cal.add_argument("--out", type=Path, help="write the thresholds JSON here")
    args = ap.parse_args(argv)
    if args.calibrate is not None:
        return calibrate_cli(args)
    names = args.site or list(SITES)
    scores = [evaluate_site(SITES[n], args.weeks, args.cabinets, not args.no_clean,
                            not args.fault_free_history) for n in names]
    if args.write_thresholds is not None:
        args.write_thresholds.mkdir(parents=True, exist_ok=True)
        for sc in scores:
            (args.write_thresholds / f"{sc.site}.json").write_text(sc.thresholds[0].to_json())
    results = [summary(sc) for sc in scores]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n\n".join(format_table(r) for r in results))
    return 0 if all(r["meets_targets"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
