"""Site transfer: the shipped models beside baselines and a site-retrained model, per preset.

    python -m models.evaluate --preset chicago-arterial [--json] [--markdown]
    python -m models.evaluate --preset berlin-street --seeds 7,8,9

For one simulated site (``models.sites``; one year, data seed 7) and its held-out test weeks:

- **shipped**: ``models/<name>.onnx`` run by onnxruntime on feature rows built with the shipped
  manifest (its fill values and its time zone), as a gateway at that site would run it;
- **calibrated**: the shipped files calibrated to the site (``models.calibrate``: its time zone,
  free-flow speed and flow level, measured on its training weeks), no retraining;
- **site-retrained**: the shipped recipe (``models.train``) trained on the site's own training
  weeks;
- **persistence** (the current window's value) and **seasonal naive** (a week back for
  traffic, a day back for load);
- **gbm**: scikit-learn's HistGradientBoostingRegressor (L1 loss, forecasting the change from
  the current value) on the site's rows, a strong off-the-shelf reference; only for this table,
  never shipped;
- traffic only: the same methods on the windows whose next window is slowing or congested
  (below 80 % of the site's free-flow speed), and the **floor**: the MAE of forecasting the
  next window's *true* mean speed (simulator truth), i.e. the measurement scatter of the target
  that no forecast can remove; and the **state oracle**: the gbm given, besides the inputs, the
  *true* mean speed of the current and the two previous windows. No gateway input is less noisy
  than that, so it bounds what any model on these inputs can reach.

``--seeds`` retrains the site model with each training seed (same data) and reports the spread.
Needs the ``train`` extra (torch) for the retrained columns and scikit-learn for ``gbm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.pipeline.features import FeatureSpec, InputSpec
from models import SHIPPED
from models.csvdata import SiteData
from models.dataset import ModelData, build
from models.manifest import Manifest, load_manifest, session_options, shipped_paths
from models.simulate import simulate_site
from models.sites import HELDOUT, PRESETS, preset

ANCHOR = {"traffic": "speed_mean", "energy": "power_mean_w"}
METHODS = ("shipped", "calibrated", "site_retrained", "persistence", "seasonal_naive", "gbm")
TRUTH = ("state_oracle", "floor")  # traffic only: references that use simulator truth


def _mae(pred: np.ndarray, y: np.ndarray) -> float:
    return round(float(np.abs(pred.astype(np.float64) - y).mean()), 4) if len(y) else float("nan")


def manifest_spec(m: Manifest) -> FeatureSpec:
    return FeatureSpec(tuple(InputSpec(i.name, i.fill) for i in m.inputs), m.window_s,
                       m.timezone, dict(m.hold_s))


def shipped_spec(name: str) -> FeatureSpec:
    return manifest_spec(load_manifest(shipped_paths(name)[1]))


def onnx_predictions(name: str, data: SiteData, onnx_path: Path, man_path: Path) -> np.ndarray:
    """The first output of a model file on the site's rows, built as its manifest says."""
    m = load_manifest(man_path)
    md = build(name, data, spec=manifest_spec(m))
    sess = ort.InferenceSession(str(onnx_path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run([m.outputs[0].name], {m.input_tensor: md.x})[0][:, 0]
    return out


def shipped_predictions(name: str, data: SiteData) -> np.ndarray:
    return onnx_predictions(name, data, *shipped_paths(name))


def calibrated_predictions(name: str, data: SiteData) -> np.ndarray:
    from models.calibrate import calibrate, training_scale

    with tempfile.TemporaryDirectory() as tmp:
        m = calibrate(name, training_scale(data), Path(tmp))
        return onnx_predictions(name, data, Path(tmp) / m.file, Path(tmp) / f"{name}.json")


def _fit_rows(md: ModelData) -> np.ndarray:
    rows: np.ndarray = md.split == 0
    return rows & (md.labels == 0) if md.name == "energy" else rows


def gbm_predictions(md: ModelData, seed: int = 0) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingRegressor

    anchor = md.x[:, md.spec.names.index(ANCHOR[md.name])]
    tr = _fit_rows(md)
    gbm = HistGradientBoostingRegressor(loss="absolute_error", max_iter=300, random_state=seed)
    gbm.fit(md.x[tr], (md.y - anchor)[tr])
    out: np.ndarray = gbm.predict(md.x) + anchor
    return out


def retrained_predictions(name: str, data: SiteData, seed: int) -> tuple[np.ndarray, Any]:
    from models.train import TrainConfig, _predict, train_energy, train_traffic

    cfg = TrainConfig(seed=seed)
    trained = train_traffic(data, cfg) if name == "traffic" else train_energy(data, cfg)
    net = trained.graph.net
    return _predict(net, trained.data.x), trained


def _true_speed(data: SiteData) -> np.ndarray:
    vin, vout = np.nan_to_num(data.col("vehicles_in")), np.nan_to_num(data.col("vehicles_out"))
    total = vin + vout
    true: np.ndarray = (data.truth["true_speed_in"] * vin + data.truth["true_speed_out"] * vout) \
        / np.where(total > 0, total, 1.0)
    return true


def true_next_speed(data: SiteData, md: ModelData) -> np.ndarray:
    """The vehicle-weighted true mean speed of each row's next window (simulator truth)."""
    out: np.ndarray = _true_speed(data)[np.searchsorted(data.ts_s, md.ts_s) + 1]
    return out


def state_oracle_predictions(data: SiteData, md: ModelData) -> np.ndarray:
    """The gbm with the true mean speed of the current and two previous windows as extra inputs."""
    true = _true_speed(data)
    at = np.searchsorted(data.ts_s, md.ts_s)
    state = np.column_stack([true[np.maximum(at - k, 0)] for k in range(3)])
    return gbm_predictions(dataclasses.replace(md, x=np.column_stack([md.x, state])))


def evaluate_model(name: str, data: SiteData, *, retrain: bool, seed: int = 7
                   ) -> dict[str, Any]:
    from models.train import free_flow_speed, slow_rows

    md = build(name, data)
    te = md.split == 2
    preds: dict[str, np.ndarray] = {
        "shipped": shipped_predictions(name, data),
        "calibrated": calibrated_predictions(name, data),
        "persistence": md.persistence,
        "seasonal_naive": md.seasonal,
        "gbm": gbm_predictions(md),
    }
    if retrain:
        preds["site_retrained"] = retrained_predictions(name, data, seed)[0]
    out: dict[str, Any] = {"rows": int(te.sum()),
                           "mae": {k: _mae(preds[k][te], md.y[te]) for k in METHODS if k in preds}}
    if name == "traffic":
        free_flow = free_flow_speed(md)
        slow = te & slow_rows(md, free_flow)
        base = _mae(md.persistence[slow], md.y[slow])
        floor = true_next_speed(data, md) if "true_speed_in" in data.truth else None
        out["free_flow_m_s"] = free_flow
        out["slowing_or_congested_next"] = {
            "rows": int(slow.sum()), "share": round(float(slow.sum() / te.sum()), 4),
            "mae": {k: _mae(preds[k][slow], md.y[slow]) for k in METHODS if k in preds},
            "skill_vs_persistence": {k: round(1 - _mae(preds[k][slow], md.y[slow]) / base, 4)
                                     for k in METHODS if k in preds and k != "persistence"},
        }
        if floor is not None:
            oracle = state_oracle_predictions(data, md)
            for key, pred in (("state_oracle", oracle), ("floor", floor)):
                out["mae"][key] = _mae(pred[te], md.y[te])
                out["slowing_or_congested_next"]["mae"][key] = _mae(pred[slow], md.y[slow])
    return out


def evaluate_site(name: str, *, retrain: bool = True, days: int = 365) -> dict[str, Any]:
    site = preset(name, days=days)
    data = simulate_site(site)
    return {"preset": name, "held_out": name in HELDOUT, "about": site.about,
            "timezone": site.timezone,
            **{m: evaluate_model(m, data, retrain=retrain) for m in SHIPPED}}


def seed_spread(name: str, seeds: list[int], days: int = 365) -> dict[str, Any]:
    from models.train import free_flow_speed, slow_rows, slow_skill

    data = simulate_site(preset(name, days=days))
    out: dict[str, Any] = {"preset": name, "seeds": seeds}
    for model in SHIPPED:
        rows = []
        for seed in seeds:
            pred, trained = retrained_predictions(model, data, seed)
            md = trained.data
            te = md.split == 2
            row: dict[str, Any] = {"seed": seed, "mae": _mae(pred[te], md.y[te])}
            if model == "traffic":
                row["slow_skill"] = slow_skill(md, pred, te & slow_rows(md, free_flow_speed(md))
                                               )["skill"]
            rows.append(row)
        maes = [r["mae"] for r in rows]
        out[model] = {"runs": rows, "mean": round(float(np.mean(maes)), 4),
                      "min": min(maes), "max": max(maes)}
        if model == "traffic":
            skills = [r["slow_skill"] for r in rows]
            out[model]["slow_skill_min"], out[model]["slow_skill_max"] = min(skills), max(skills)
    return out


def markdown_rows(result: dict[str, Any]) -> list[str]:
    """Model-card rows: preset | MAE per method | slowing+congested MAE per method."""
    def cell(d: dict[str, Any], k: str, fmt: str) -> str:
        v = d.get(k)
        return "-" if v is None else format(v, fmt)

    name = result["preset"] + (" (held out)" if result["held_out"] else "")
    t, e = result["traffic"], result["energy"]
    s = t["slowing_or_congested_next"]
    traffic = " | ".join(cell(t["mae"], k, ".3f") for k in (*METHODS, *TRUTH))
    slow = " | ".join(cell(s["mae"], k, ".3f") for k in (*METHODS, *TRUTH))
    energy = " | ".join(cell(e["mae"], k, ".1f") for k in METHODS)
    return [f"| {name} | traffic, all windows (m/s) | {traffic} |",
            f"| | traffic, next window slowing/congested ({s['share']:.1%}) | {slow} |",
            f"| | energy (W) | {energy} | | |"]


def _print(result: dict[str, Any]) -> None:
    print(f"{result['preset']}{' (held out)' if result['held_out'] else ''}: {result['about']}")
    for model in SHIPPED:
        r = result[model]
        unit = "m/s" if model == "traffic" else "W"
        print(f"  {model} ({r['rows']} test rows), MAE {unit}: "
              + "  ".join(f"{k} {v}" for k, v in r["mae"].items()))
        if model == "traffic":
            s = r["slowing_or_congested_next"]
            print(f"    next window slowing/congested ({s['rows']} rows, {s['share']:.1%}): "
                  + "  ".join(f"{k} {v}" for k, v in s["mae"].items()))
            print("    skill vs persistence: "
                  + "  ".join(f"{k} {v:.1%}" for k, v in s["skill_vs_persistence"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.evaluate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", choices=list(PRESETS),
                    help="site preset (repeatable; default: all)")
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--no-retrain", action="store_true", help="skip the site-retrained model")
    ap.add_argument("--seeds", default="", help="comma-separated training seeds: seed spread")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--markdown", action="store_true", help="print model-card table rows")
    args = ap.parse_args(argv)
    names = args.preset or list(PRESETS)
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        spreads = [seed_spread(n, seeds, args.days) for n in names]
        print(json.dumps(spreads, indent=2))
        return 0
    results = [evaluate_site(n, retrain=not args.no_retrain, days=args.days) for n in names]
    for r in results:
        if args.json:
            print(json.dumps(r, indent=2))
        elif args.markdown:
            print("\n".join(markdown_rows(r)))
        else:
            _print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
