"""Calibrate a trained model to another site without retraining it.

    python -m models.calibrate --csv site.csv --tz America/Chicago --out DIR
    python -m models.calibrate --preset chicago-arterial --out DIR

A model trained on one street learns that street's speeds and flows: run elsewhere it pulls
every forecast towards them (see the model card's site transfer table). Calibration needs three
things from the new site, all measurable in a few days of its data:

- its **time zone**, which the gateway uses for the hour and day-of-week inputs;
- its **free-flow speed** (median speed of windows with loop occupancy under 4 %);
- its **flow level** (99th percentile of the 5-minute flow), which absorbs lanes and demand.

The calibrated graph is the trained one with the site in its units: speed inputs are scaled by
``trained free flow / site free flow`` and flow inputs by ``trained flow level / site flow
level`` before the graph runs, and the forecast speed scaled back. Congestion thresholds stay
fractions of the free-flow speed, so they move with it. The energy model only takes the time
zone. The site's numbers are stored in the graph's metadata, so a calibrated file has its own
sha256 and version, and in the manifest (``training.calibration``); the trained model's test
metrics are not carried over, they belong to the training site.

Needs the ``onnx`` package (dev or train extra), not torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from models.csvdata import SiteData, SiteDataError, read_csv
from models.dataset import quantities, split_of
from models.manifest import (
    VERSION_CHARS,
    Manifest,
    load_manifest,
    sha256_bytes,
    shipped_paths,
    verify,
)

META_SITE = "edge_agent.site"
LIGHT_OCCUPANCY = 0.04
FLOW_QUANTILE = 99.0


@dataclass(frozen=True)
class SiteScale:
    timezone: str
    free_flow_m_s: float
    flow_p99_veh_h: float


def site_scale(data: SiteData, rows: np.ndarray | None = None) -> SiteScale:
    """The calibration numbers of a site, from its windows (``rows``: which ones to use)."""
    q = quantities(data)
    use = np.ones(len(data), dtype=bool) if rows is None else rows
    speed, flow, occ = q["speed_mean"], q["flow_veh_h"], q["occupancy"]
    with np.errstate(invalid="ignore"):
        light = use & (flow > 0) & (occ < LIGHT_OCCUPANCY) & np.isfinite(speed)
    busy = use & np.isfinite(flow)
    if light.sum() < 12 or busy.sum() < 12:
        raise SiteDataError("too few windows with traffic to calibrate on (need speed, flow "
                            "and occupancy)")
    return SiteScale(data.timezone, round(float(np.median(speed[light])), 3),
                     round(float(np.percentile(flow[busy], FLOW_QUANTILE)), 1))


def training_scale(data: SiteData) -> SiteScale:
    """The numbers of the site a model was trained on (its training weeks)."""
    return site_scale(data, split_of(data.ts_s) == 0)


def _input_scales(m: Manifest, trained: SiteScale, site: SiteScale) -> tuple[np.ndarray, float]:
    speed = trained.free_flow_m_s / site.free_flow_m_s
    flow = trained.flow_p99_veh_h / site.flow_p99_veh_h
    scale = np.ones(len(m.inputs), dtype=np.float32)
    for k, name in enumerate(m.input_names):
        if name.startswith("speed_"):
            scale[k] = speed
        elif name.startswith("flow_veh_h"):
            scale[k] = flow
    return scale, speed


def calibrated_graph(model: Any, m: Manifest, scale: np.ndarray, speed_scale: float,
                     site: dict[str, Any]) -> Any:
    """A copy of ``model`` that scales its input first and its speed output last."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    raw = m.input_tensor
    scaled = f"{raw}_site_scaled"
    for node in g.node:
        node.input[:] = [scaled if i == raw else i for i in node.input]
    g.initializer.append(numpy_helper.from_array(scale.reshape(1, -1), "site_input_scale"))
    nodes = [helper.make_node("Mul", [raw, "site_input_scale"], [scaled], name="site_scale_in")]
    if m.congestion is not None:
        # The forecast speed is the output that is not the congestion level; the level is
        # computed from it inside the graph, in trained units, against trained thresholds.
        speed_out = next(o.name for o in m.outputs if o.name != m.congestion.output)
        inner = f"{speed_out}_trained_units"
        for node in g.node:
            node.output[:] = [inner if o == speed_out else o for o in node.output]
            node.input[:] = [inner if i == speed_out else i for i in node.input]
        g.initializer.append(numpy_helper.from_array(
            np.array(1.0 / speed_scale, dtype=np.float32), "site_output_scale"))
        tail = [helper.make_node("Mul", [inner, "site_output_scale"], [speed_out],
                                 name="site_scale_out")]
    else:
        tail = []
    kept = []
    for node in g.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        kept.append(copy)
    del g.node[:]
    g.node.extend(nodes + kept + tail)
    entry = out.metadata_props.add()
    entry.key, entry.value = META_SITE, json.dumps(site, sort_keys=True)
    onnx.checker.check_model(out)
    return out


def trained_scale(m: Manifest) -> SiteScale:
    """The training site's numbers, as training recorded them in the manifest."""
    try:
        return SiteScale(**m.training["site_scale"])
    except (KeyError, TypeError):
        raise SiteDataError(f"model {m.name} {m.version}: its manifest records no "
                            "training.site_scale; retrain it to calibrate it") from None


def calibrate(name: str, site: SiteScale, out_dir: Path, source: Path | None = None
              ) -> Manifest:
    """Write ``<name>.onnx`` and ``<name>.json`` calibrated to ``site`` into ``out_dir``
    (from the shipped model, or the ``source`` .onnx with its manifest beside it)."""
    import onnx

    onnx_path, man_path = (source, source.with_suffix(".json")) if source else shipped_paths(name)
    m = load_manifest(man_path)
    trained = trained_scale(m)
    ZoneInfo(site.timezone)  # fail before writing anything
    scale, speed_scale = _input_scales(m, trained, site)
    if m.congestion is None:
        scale[:], speed_scale = 1.0, 1.0
    record = {"calibrated_from": m.version, "timezone": site.timezone,
              "trained": {"free_flow_m_s": trained.free_flow_m_s,
                          "flow_p99_veh_h": trained.flow_p99_veh_h},
              "site": {"free_flow_m_s": site.free_flow_m_s,
                       "flow_p99_veh_h": site.flow_p99_veh_h}}
    model = calibrated_graph(onnx.load(str(onnx_path)), m, scale, speed_scale, record)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"
    data = model.SerializeToString()
    path.write_bytes(data)
    digest = sha256_bytes(data)
    doc = m.model_dump()
    doc.update(version=digest[:VERSION_CHARS], sha256=digest, file=path.name,
               timezone=site.timezone, metrics={},
               training={**m.training, "calibration": record})
    # Fill values are fed raw, in the site's units, like every other input.
    doc["inputs"] = [{**i, "fill": round(float(i["fill"]) / float(s), 6)}
                     for i, s in zip(doc["inputs"], scale, strict=True)]
    if doc.get("congestion"):
        doc["congestion"]["free_flow_speed_m_s"] = site.free_flow_m_s
    out = Manifest.model_validate(doc)
    man_out = out_dir / f"{name}.json"
    man_out.write_text(json.dumps(out.model_dump(), indent=2) + "\n", encoding="utf-8")
    verify(path, man_out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.calibrate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--csv", help="the new site's data (schema: models/csvdata.py)")
    ap.add_argument("--tz", default="UTC", help="IANA time zone of the site (for --csv)")
    ap.add_argument("--preset", help="a simulated site preset instead of --csv (training weeks)")
    ap.add_argument("--models", default="traffic,energy")
    ap.add_argument("--out", required=True, help="directory for the calibrated models")
    args = ap.parse_args(argv)
    from models.simulate import simulate_site
    from models.sites import UnknownPreset, preset

    try:
        if args.csv:
            data = read_csv(args.csv, tz=args.tz)
            site = site_scale(data)
        elif args.preset:
            data = simulate_site(preset(args.preset))
            site = training_scale(data)
        else:
            print("error: give --csv (with --tz) or --preset")
            return 2
    except (SiteDataError, OSError, UnknownPreset) as exc:
        print(f"error: {exc}")
        return 2
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        try:
            m = calibrate(name, site, Path(args.out))
        except SiteDataError as exc:
            print(f"error: {exc}")
            return 2
        print(f"{name}: {m.version} for tz {site.timezone}, free flow {site.free_flow_m_s} m/s, "
              f"flow p99 {site.flow_p99_veh_h} veh/h -> {Path(args.out) / m.file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
