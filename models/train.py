"""Train, evaluate and export the edge models.

    python -m models.train                      # simulated site (the shipped models)
    python -m models.train --preset chicago-arterial --out DIR
    python -m models.train --csv site.csv --tz Europe/Vienna --out DIR

Needs the ``train`` extra (torch==2.13.0, onnx, onnxscript); torch is imported only when
training starts, so this module imports without it. Training is deterministic: one CPU thread,
fixed seeds, fixed data order; a rerun reproduces the metrics of the shipped manifests.

Each model is compared on the held-out test weeks with persistence (the current window's value),
a seasonal naive forecast (the same window one week earlier for traffic, one day earlier for
load) and the original 4-64-1 MLP trained on the same rows.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from models.csvdata import SiteData, SiteDataError, read_csv
from models.dataset import SHORT_WEEKS, WEEK_S, ModelData, Trained, build

log = logging.getLogger(__name__)

SLOWING_BELOW = 0.8
CONGESTED_BELOW = 0.5
LEVELS = ["free", "slowing", "congested"]
ANOMALY_QUANTILE = 0.995
# Huber threshold in standard deviations of the forecast change: this small, the loss is L1
# but for the last few hundredths. The score is MAE and the targets are step signals (charger
# starts) or carry the scatter of a few vehicles: the median is what to forecast.
HUBER = 0.05
# Windows whose next window is slowing or congested weigh this much more in the traffic loss:
# they are the ones operators act on, and few enough that an unweighted fit treats an onset
# as noise.
SLOW_WEIGHT = 2.0
# A site's own rows weigh this much more than the training site's when a short history is
# trained with the training site as a prior.
SITE_WEIGHT = 4.0
PRIOR_SITE = "berlin-street"
ORIGINAL_HIDDEN = 64
# Differences the forecaster sees beside its inputs (see ``models.nets.Forecaster``).
DIFFERENCES = {
    "traffic": (
        ("speed_mean", "speed_mean_lag1"), ("speed_mean_lag1", "speed_mean_lag2"),
        ("speed_mean_lag2", "speed_mean_lag3"), ("speed_in_mean", "speed_mean"),
        ("speed_out_mean", "speed_mean"), ("flow_veh_h", "flow_veh_h_lag1"),
        ("flow_veh_h_lag1", "flow_veh_h_lag2"), ("flow_veh_h_lag2", "flow_veh_h_lag3"),
    ),
    "energy": (
        ("power_mean_w", "power_mean_w_lag1"), ("power_mean_w_lag1", "power_mean_w_lag2"),
        ("power_mean_w_lag2", "power_mean_w_lag3"), ("power_mean_w_lag3", "power_mean_w_lag5"),
        ("power_mean_w_lag5", "power_mean_w_lag11"), ("power_mean_w", "power_mean_w_lag287"),
    ),
}


class TrainUnavailable(RuntimeError):
    """Training was asked for on an install without the train extra."""


def require_torch() -> ModuleType:
    try:
        import torch
    except ImportError:
        raise TrainUnavailable(
            "training needs the train extra: pip install 'edge-agent-gateway[train]' "
            "(torch==2.13.0, onnx, onnxscript)"
        ) from None
    module: ModuleType = torch
    return module


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    hidden: int = 96
    depth: int = 3
    seed: int = 7
    # A short history (a site's first weeks) gives few batches an epoch: train for at least
    # this many steps. A year of data makes more in its 60 epochs, so it changes nothing there.
    min_steps: int = 4000


def scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = pred.astype(np.float64) - y.astype(np.float64)
    return {"mae": round(float(np.abs(err).mean()), 4),
            "rmse": round(float(np.sqrt((err**2).mean())), 4)}


def _target(net: Any, x: Any, y: Any) -> Any:
    """The standardized quantity the net outputs: the target, or its change from the anchor."""
    base = x[:, net.anchor : net.anchor + 1] if net.anchor is not None else 0.0
    return (y.reshape(-1, 1) - base - net.y_mean) / net.y_std


def mix_matrix(names: tuple[str, ...], pairs: tuple[tuple[str, str], ...]) -> np.ndarray:
    """(n_inputs, n_inputs + len(pairs)): the inputs, then input a minus input b per pair."""
    n = len(names)
    mix = np.zeros((n, n + len(pairs)), dtype=np.float32)
    mix[:, :n] = np.eye(n, dtype=np.float32)
    for k, (a, b) in enumerate(pairs):
        mix[names.index(a), n + k] = 1.0
        mix[names.index(b), n + k] = -1.0
    return mix


def _fit(net: Any, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, *,
         cfg: TrainConfig, huber: float | None = None,
         weight: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Minibatch AdamW on the standardized target (MSE, or Huber with threshold ``huber``),
    optionally with per-row weights (training, validation); keeps the epoch with the lowest
    validation loss."""
    torch = require_torch()
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss_of(pred: Any, want: Any, w: Any) -> Any:
        if huber is None:
            each = (pred - want) ** 2
        else:
            each = torch.nn.functional.huber_loss(pred, want, delta=huber, reduction="none")
        return torch.mean(each) if w is None else torch.sum(each * w) / torch.sum(w)

    xt, xvt = torch.from_numpy(x), torch.from_numpy(xv)
    z = _target(net, xt, torch.from_numpy(y))
    zv = _target(net, xvt, torch.from_numpy(yv))
    w, wv = (None, None) if weight is None else (
        torch.from_numpy(weight[0].astype(np.float32)).reshape(-1, 1),
        torch.from_numpy(weight[1].astype(np.float32)).reshape(-1, 1))
    steps = max(1, len(x) // cfg.batch)
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    best = (float("inf"), 0, {k: v.clone() for k, v in net.state_dict().items()})
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps):
            idx = order[s * cfg.batch : (s + 1) * cfg.batch]
            loss = loss_of(net.standardized(xt[idx]), z[idx], None if w is None else w[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            val = float(loss_of(net.standardized(xvt), zv, wv))
        if val < best[0]:
            best = (val, epoch, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    net.eval()
    return {"best_epoch": best[1] + 1, "val_loss": round(best[0], 5),
            "loss": "mse" if huber is None else f"huber({huber})",
            **({} if weight is None else {"weighted_rows": int((weight[0] != 1).sum())})}


def _predict(net: Any, x: np.ndarray) -> np.ndarray:
    torch = require_torch()
    with torch.no_grad():
        out: np.ndarray = net(torch.from_numpy(x)).reshape(-1).numpy()
        return out


def _net(cls: Any, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, anchor: int | None = None,
         mix: np.ndarray | None = None, hidden: int | None = None) -> Any:
    torch = require_torch()
    torch.manual_seed(cfg.seed)
    f = x @ mix if mix is not None else x
    std = f.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    t = y - x[:, anchor] if anchor is not None else y
    return cls(torch.from_numpy(f.mean(axis=0)), torch.from_numpy(std.astype(np.float32)),
               float(t.mean()), float(t.std()), hidden=hidden or cfg.hidden, depth=cfg.depth,
               anchor=anchor, mix=None if mix is None else torch.from_numpy(mix))


def fit_forecaster(md: ModelData, train_rows: np.ndarray, cfg: TrainConfig, *,
                   anchor: int | None, huber: float | None,
                   weight: np.ndarray | None = None) -> tuple[Any, dict[str, Any]]:
    """The forecaster of model ``md.name``, fitted on ``train_rows``, checked on validation."""
    from models.nets import Forecaster

    tr, va = train_rows, md.split == 1
    mix = mix_matrix(md.spec.names, DIFFERENCES[md.name])
    net = _net(Forecaster, md.x[tr], md.y[tr], cfg, anchor=anchor, mix=mix)
    t0 = time.perf_counter()
    info = _fit(net, md.x[tr], md.y[tr], md.x[va], md.y[va], cfg=cfg, huber=huber,
                weight=None if weight is None else (weight[tr], weight[va]))
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return net, info


def _fit_both(md: ModelData, train_rows: np.ndarray, cfg: TrainConfig, *,
              anchor: int | None = None, huber: float | None = None,
              weight: np.ndarray | None = None) -> tuple[Any, Any, dict[str, Any]]:
    from models.nets import OriginalMLP

    tr, va = train_rows, md.split == 1
    net, info = fit_forecaster(md, tr, cfg, anchor=anchor, huber=huber, weight=weight)
    orig = _net(OriginalMLP, md.original_x[tr], md.y[tr], cfg, hidden=ORIGINAL_HIDDEN)
    info["original_mlp"] = _fit(orig, md.original_x[tr], md.y[tr], md.original_x[va],
                                md.y[va], cfg=cfg)
    return net, orig, info


def scored_rows(md: ModelData) -> tuple[np.ndarray, str]:
    """The rows metrics are reported on: the test weeks, or (a short history has none) the
    validation days."""
    te: np.ndarray = md.split == 2
    if te.any():
        return te, "test weeks"
    va: np.ndarray = md.split == 1
    return va, "validation days"


def _comparison(md: ModelData, pred: np.ndarray, orig: np.ndarray) -> dict[str, Any]:
    te, split = scored_rows(md)
    return {
        "split": split, "rows": int(te.sum()),
        "model": scores(pred[te], md.y[te]),
        "persistence": scores(md.persistence[te], md.y[te]),
        "seasonal_naive": scores(md.seasonal[te], md.y[te]),
        "original_mlp": scores(orig[te], md.y[te]),
    }


def _levels(speed: np.ndarray, free_flow: float) -> np.ndarray:
    slowing = (speed < SLOWING_BELOW * free_flow).astype(int)
    congested = (speed < CONGESTED_BELOW * free_flow).astype(int)
    out: np.ndarray = slowing + congested
    return out


def free_flow_speed(md: ModelData) -> float:
    """The site's free-flow speed: median next-window speed of training rows whose current
    loop occupancy is low (under 4 %: a few vehicles per lane-km, whatever the lanes)."""
    occ = md.x[:, md.spec.names.index("occupancy")]
    light = (md.split == 0) & (md.x[:, 0] > 0) & (occ < 0.04)
    return round(float(np.median(md.y[light])), 3)


def slow_rows(md: ModelData, free_flow: float) -> np.ndarray:
    """Rows whose next window is slowing or congested (measured speed below 80 % of free flow)."""
    out: np.ndarray = md.y < SLOWING_BELOW * free_flow
    return out


def slow_skill(md: ModelData, pred: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """MAE in the given rows beside persistence's, and the model's skill (1 - ratio)."""
    model = float(np.abs(pred[rows] - md.y[rows]).mean()) if rows.any() else float("nan")
    base = float(np.abs(md.persistence[rows] - md.y[rows]).mean()) if rows.any() else float("nan")
    return {"rows": int(rows.sum()), "model_mae": round(model, 4),
            "persistence_mae": round(base, 4), "skill": round(1 - model / base, 4)}


def with_prior(md: ModelData, prior: SiteData | None) -> tuple[ModelData, np.ndarray]:
    """A short site history with a prior: the training site's rows join the training rows
    (built with the site's feature spec, each in its own local time), and every site row weighs
    ``SITE_WEIGHT`` times a prior row. Validation and scores stay the site's own. Returns the
    rows and their weights."""
    site_w = np.ones(len(md.y))
    if prior is None:
        return md, site_w
    pr = build(md.name, prior, spec=md.spec)
    keep = pr.split != 2  # the prior's test weeks stay unseen, as in the shipped training
    joined = ModelData(
        md.name, md.spec, np.concatenate([md.x, pr.x[keep]]), np.concatenate([md.y, pr.y[keep]]),
        np.concatenate([md.split, np.zeros(int(keep.sum()), dtype=md.split.dtype)]),
        np.concatenate([md.persistence, pr.persistence[keep]]),
        np.concatenate([md.seasonal, pr.seasonal[keep]]),
        np.concatenate([md.original_x, pr.original_x[keep]]),
        np.concatenate([md.labels, pr.labels[keep]]), np.concatenate([md.ts_s, pr.ts_s[keep]]))
    return joined, np.concatenate([site_w * SITE_WEIGHT, np.ones(int(keep.sum()))])


def short_history(md: ModelData) -> bool:
    """A site's first weeks (the short split: validation days, no test weeks)."""
    return not bool((md.split == 2).any())


def with_trees(net: Any, md: ModelData, anchor: int, info: dict[str, Any]) -> Any:
    """The net blended with gradient-boosted trees fitted on the same training rows."""
    from models.nets import Blend, TreeEnsemble
    from models.trees import fit_trees

    torch = require_torch()
    tr = md.split == 0
    t0 = time.perf_counter()
    tables = fit_trees(md.x[tr], (md.y - md.x[:, anchor])[tr])
    trees = TreeEnsemble(torch.from_numpy(tables.index), torch.from_numpy(tables.sign),
                         torch.from_numpy(tables.threshold), torch.from_numpy(tables.value),
                         tables.base)
    info["trees"] = {"leaves": int(tables.value.size), "blend": "mean of net and trees",
                     "seconds": round(time.perf_counter() - t0, 1)}
    return Blend(net, trees, anchor).eval()


def train_traffic(data: SiteData, cfg: TrainConfig, prior: SiteData | None = None,
                  trees: bool | None = None) -> Trained:
    """The traffic model; ``trees`` (default: on a short history) blends in a tree ensemble."""
    from models.nets import TrafficGraph

    torch = require_torch()
    torch.set_num_threads(1)
    site = build("traffic", data)
    free_flow = free_flow_speed(site)
    md, rows_w = with_prior(site, prior)
    weight = np.where(slow_rows(md, free_flow), SLOW_WEIGHT, 1.0) * rows_w
    anchor = md.spec.names.index("speed_mean")
    net, orig, info = _fit_both(md, md.split == 0, cfg, anchor=anchor, huber=HUBER,
                                weight=weight)
    if short_history(md) if trees is None else trees:
        net = with_trees(net, md, anchor, info)
    pred, opred = _predict(net, md.x), _predict(orig, md.original_x)
    metrics = _comparison(md, pred, opred)
    te, _ = scored_rows(md)
    metrics["slowing_or_congested_next"] = slow_skill(md, pred, te & slow_rows(md, free_flow))
    actual = _levels(md.y[te], free_flow)
    for key, forecast in (("model", pred), ("persistence", md.persistence)):
        got = _levels(forecast[te], free_flow)
        congested = actual == 2
        metrics[key]["congestion_accuracy"] = round(float((got == actual).mean()), 4)
        metrics[key]["congested_recall"] = round(float((got[congested] == 2).mean()), 4) \
            if congested.any() else None
    metrics["congestion_share"] = [round(float((actual == k).mean()), 4) for k in range(3)]
    graph = TrafficGraph(net, free_flow, SLOWING_BELOW, CONGESTED_BELOW).eval()
    extra = {"congestion": {"output": "congestion_level", "free_flow_speed_m_s": free_flow,
                            "slowing_below": SLOWING_BELOW, "congested_below": CONGESTED_BELOW}}
    return Trained("traffic", md, graph, ["speed_next", "congestion_level"], metrics, extra, info)


def _events(labels: np.ndarray, ts_s: np.ndarray, window_s: int) -> list[np.ndarray]:
    """Index runs of consecutive labelled windows."""
    idx = np.flatnonzero(labels > 0)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(ts_s[idx]) != window_s) + 1
    return np.split(idx, breaks)


def train_energy(data: SiteData, cfg: TrainConfig, prior: SiteData | None = None) -> Trained:
    from models.nets import EnergyGraph

    torch = require_torch()
    torch.set_num_threads(1)
    md, rows_w = with_prior(build("energy", data), prior)
    # Known faults (an ``anomaly`` column) are kept out of the fit, not out of the evaluation.
    # Load is a step signal (chargers start and stop): the net forecasts the change from the
    # current load with an L1-like loss, so unforecastable steps do not pull every forecast.
    net, orig, info = _fit_both(md, (md.split == 0) & (md.labels == 0), cfg,
                                anchor=md.spec.names.index("power_mean_w"), huber=HUBER,
                                weight=None if prior is None else rows_w)
    pred, opred = _predict(net, md.x), _predict(orig, md.original_x)
    metrics = _comparison(md, pred, opred)
    resid = md.y - pred
    va = (md.split == 1) & (md.labels == 0)
    med = float(np.median(resid[va]))
    scale = float(1.4826 * np.median(np.abs(resid[va] - med)))
    threshold = float(np.quantile(np.abs(resid[va]) / scale, ANOMALY_QUANTILE))
    te, _ = scored_rows(md)
    flagged = np.abs(resid) / scale > threshold
    events = _events(md.labels * te, md.ts_s, data.window_s)
    # A one-step forecast residual sees the onset of a fault: count an event as found when one
    # of its first three windows is flagged.
    found = sum(bool(flagged[e[:3]].any()) for e in events)
    metrics["anomaly"] = {
        "threshold": round(threshold, 3), "scale_w": round(scale, 2),
        "flag_rate_normal_windows": round(float(flagged[te & (md.labels == 0)].mean()), 4),
        "events": len(events), "events_found": int(found),
    }
    extra = {"anomaly": {"forecast": "power_next_w", "actual": "power_mean_w",
                         "scale": round(scale, 3), "threshold": round(threshold, 3)}}
    return Trained("energy", md, EnergyGraph(net).eval(), ["power_next_w"], metrics, extra, info)


def describe(data: SiteData, source: str) -> str:
    days = len(data) * data.window_s / 86_400
    return (f"{source}: {len(data)} windows of {data.window_s} s ({days:.0f} days), "
            f"tz {data.timezone}")


def train_all(data: SiteData, out_dir: Path, cfg: TrainConfig, names: list[str], *, source: str,
              samples: bool = False, prior: SiteData | None = None) -> dict[str, dict[str, Any]]:
    from models.calibrate import training_scale
    from models.export import export_trained, write_samples

    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        # The prior helps the energy model (a year of lamp switching and charging sessions that
        # a fortnight cannot show); another road's speeds only pull a traffic model off this
        # one's (on the design sites: 14.1 -> 13.9 % and 28.1 -> 23.6 % skill).
        trained = (train_traffic(data, cfg) if name == "traffic"
                   else train_energy(data, cfg, prior))
        trained.training.update({"config": asdict(cfg), "source": describe(data, source),
                                 "site_scale": asdict(training_scale(data))})
        manifest = export_trained(trained, out_dir)
        if samples:
            write_samples(trained, data, out_dir / "samples" / f"{name}.json", manifest)
        results[name] = trained.metrics
        log.info("%s: %s", name, trained.metrics)
    return results


def prior_for(data: SiteData, choice: str) -> SiteData | None:
    """The prior a site history trains with: none for a long history or 'none', else the
    named simulated preset's year ('auto': the training site's)."""
    if choice == "none":
        return None
    span_s = int(data.ts_s[-1] - data.ts_s[0]) if len(data) else 0
    if choice == "auto" and span_s >= SHORT_WEEKS * WEEK_S:
        return None
    from models.simulate import simulate_site
    from models.sites import preset

    return simulate_site(preset(PRIOR_SITE if choice == "auto" else choice))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
    ap.add_argument("--csv", help="site data CSV (schema: models/csvdata.py); default: simulated")
    ap.add_argument("--tz", default="UTC", help="IANA time zone of the site (for --csv)")
    ap.add_argument("--window-s", type=int, default=300)
    ap.add_argument("--days", type=int, default=365, help="simulated days (without --csv)")
    ap.add_argument("--preset", default="berlin-street",
                    help="simulated site preset (models.sites; without --csv)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent),
                    help="directory for <name>.onnx and <name>.json")
    ap.add_argument("--models", default="traffic,energy")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--samples", action="store_true", help="also write sample windows")
    ap.add_argument("--prior", default="auto",
                    help="simulated site preset whose year joins a short --csv history as a "
                         "prior ('auto': the training site's when the CSV spans under "
                         f"{SHORT_WEEKS} weeks; 'none')")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in ("traffic", "energy")]
    if bad:
        print(f"unknown model(s) {bad}; known: traffic, energy")
        return 2
    try:
        require_torch()
        if args.csv:
            data, source = read_csv(args.csv, args.window_s, args.tz), f"site CSV {args.csv}"
        else:
            from models.simulate import simulate_site
            from models.sites import preset

            data = simulate_site(preset(args.preset, days=args.days, seed=args.seed))
            source = f"simulated site ({args.preset}, models.simulate, seed {args.seed})"
    except (TrainUnavailable, SiteDataError, OSError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
        return 1 if isinstance(exc, TrainUnavailable) else 2
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed)
    try:
        prior = prior_for(data, args.prior if args.csv else "none")
    except KeyError as exc:
        print(f"error: {exc.args[0]}")
        return 2
    if prior is not None:
        source += f", with the simulated {args.prior if args.prior != 'auto' else PRIOR_SITE}"
        source += " year as a prior"
    results = train_all(data, Path(args.out), cfg, names, source=source, samples=args.samples,
                        prior=prior)
    for name, m in results.items():
        print(f"{name}: test rows {m['rows']}")
        for key in ("model", "persistence", "seasonal_naive", "original_mlp"):
            print(f"  {key:15s} MAE {m[key]['mae']:10.4f}  RMSE {m[key]['rmse']:10.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
