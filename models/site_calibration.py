"""Calibrating the models to a new site from the gateway's own history, end to end.

    python -m models.site_calibration [--presets chicago-arterial,seville-suburb,heldout-ring]
                                      [--history-days 14] [--test-days 14] [--seed 11] [--json]

For each simulated site: its first ``history-days`` go through the gateway's history recorder
(``agent.pipeline.history``) as 10 s traffic and 60 s energy stream windows, come out of the
export as the training CSV, and train a site model with the shipped recipe (``models.train``,
short-history split, the training site's simulated year as a prior that the site's rows
outweigh for energy, the net averaged with a tree ensemble for traffic). The site model, the
shipped model, the shipped model calibrated from the same history (``models.calibrate``) and
persistence are then scored on the ``test-days`` that follow, which no step has seen. Needs
the ``train`` extra.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from models.csvdata import SiteData, read_csv
from models.dataset import build
from models.evaluate import manifest_spec, onnx_predictions
from models.manifest import load_manifest, shipped_paths

DESIGN = ("chicago-arterial", "seville-suburb")
HELD_OUT = "heldout-ring"
TARGET_SKILL = 0.15


def record_history(data: SiteData, days: int, db: Path) -> None:
    """Feed the site's first ``days`` to the gateway's history recorder as stream windows."""
    from agent.pipeline.history import HistoryRecorder
    from models.windows_io import site_window, split_window

    rows = min(len(data), days * 86_400 // data.window_s)
    rec = HistoryRecorder(db, window_s=data.window_s, traffic_streams={"traffic"},
                          energy_streams={"energy"})
    rec.open()
    try:
        for i in range(rows):
            parts = split_window(site_window(data, i, "traffic", "traffic"), 30)
            parts += split_window(site_window(data, i, "energy", "energy"), 5)
            for w in sorted(parts, key=lambda w: (w.end_ns, w.stream)):
                rec.observe(w)
    finally:
        rec.close()


def exported(db: Path, out: Path, tz: str, window_s: int) -> SiteData:
    from agent.pipeline.history import export_csv

    with out.open("w", encoding="utf-8", newline="") as fh:
        export_csv(db, fh)
    return read_csv(out, window_s, tz)


def _mae(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(pred.astype(np.float64) - y).mean())


def evaluate_site(site: str, history_days: int, test_days: int, seed: int, *,
                  cfg: Any = None, prior: SiteData | None = None) -> dict[str, Any]:
    from models.calibrate import calibrate, training_scale
    from models.simulate import simulate_site
    from models.sites import preset
    from models.train import TrainConfig, train_all

    data = simulate_site(preset(site, days=history_days + test_days, seed=seed))
    split_s = int(data.ts_s[0]) + history_days * 86_400
    out: dict[str, Any] = {"site": site, "history_days": history_days, "test_days": test_days,
                           "seed": seed, "timezone": data.timezone}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        record_history(data, history_days, tmp / "history.db")
        history = exported(tmp / "history.db", tmp / "site.csv", data.timezone, data.window_s)
        out["history_rows"] = len(history)
        train_all(history, tmp / "site", cfg or TrainConfig(), ["traffic", "energy"],
                  source=f"history export of {site}", prior=prior)
        for name in ("traffic", "energy"):
            onnx_path, man_path = tmp / "site" / f"{name}.onnx", tmp / "site" / f"{name}.json"
            md = build(name, data, spec=manifest_spec(load_manifest(man_path)))
            test = md.ts_s >= split_s
            y = md.y[test]
            cal = calibrate(name, training_scale(history), tmp / f"cal-{name}")
            preds = {
                "site_model": onnx_predictions(name, data, onnx_path, man_path),
                "shipped": onnx_predictions(name, data, *shipped_paths(name)),
                "calibrated": onnx_predictions(name, data, tmp / f"cal-{name}" / cal.file,
                                               tmp / f"cal-{name}" / f"{name}.json"),
            }
            base = _mae(md.persistence[test], y)
            res: dict[str, Any] = {"rows": int(test.sum()), "persistence": round(base, 4)}
            for key, p in preds.items():
                mae = _mae(p[test], y)
                res[key] = round(mae, 4)
                res[f"{key}_skill"] = round(1 - mae / base, 4)
            out[name] = res
    return out


def _line(r: dict[str, Any]) -> str:
    cells = [r["site"] + (" (held out)" if r["site"] == HELD_OUT else "")]
    for name in ("traffic", "energy"):
        m = r[name]
        cells += [f"{m['site_model']:.3f}", f"{m['persistence']:.3f}",
                  f"{100 * m['site_model_skill']:.1f} %", f"{m['calibrated']:.3f}",
                  f"{m['shipped']:.3f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.site_calibration",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join((*DESIGN, HELD_OUT)))
    ap.add_argument("--history-days", type=int, default=14)
    ap.add_argument("--test-days", type=int, default=14)
    ap.add_argument("--seed", type=int, default=11, help="simulation seed")
    ap.add_argument("--no-prior", dest="prior", action="store_false",
                    help="train on the history alone, without the training site's year")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from models.simulate import simulate_site
    from models.sites import preset
    from models.train import PRIOR_SITE

    prior = simulate_site(preset(PRIOR_SITE)) if args.prior else None
    results = [evaluate_site(p.strip(), args.history_days, args.test_days, args.seed,
                             prior=prior)
               for p in args.presets.split(",") if p.strip()]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| site | traffic: site model | persistence | skill | calibrated | shipped "
          "| energy: site model | persistence | skill | calibrated | shipped |")
    print("|---" * 11 + "|")
    for r in results:
        print(_line(r))
    ok = all(r[n]["site_model_skill"] >= TARGET_SKILL for r in results for n in ("traffic",
                                                                              "energy"))
    print(f"\nevery site model >= {TARGET_SKILL:.0%} better than persistence: "
          f"{'yes' if ok else 'no'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
