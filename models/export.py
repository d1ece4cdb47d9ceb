"""Export a trained model to ONNX, check it against torch, write its manifest and samples.

The graph takes one float tensor ``features`` of shape (batch, n_inputs) in the manifest's units
(scaling is inside the graph) and returns one (batch, 1) tensor per output. Exported with the
dynamo exporter at opset 20 into a single file; the input and output names are stored in the
graph's metadata so a manifest that names other inputs is caught at load time.

The exporter annotates every node with where it came from: the Python stack trace (absolute
paths of the source tree), FX node names and export-time symbol numbers. None of that is
needed to run the graph, and it would make the file's sha256 (the model version) depend on
the checkout path and on what else the process exported before. ``strip_provenance`` drops
all of it, so the same training run gives the same bytes from any folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.csvdata import SiteData
from models.dataset import FORECASTS, UNITS, Trained, input_ranges
from models.manifest import (
    META_INPUTS,
    META_OUTPUTS,
    VERSION_CHARS,
    Manifest,
    session_options,
    sha256_bytes,
    verify,
)
from models.windows_io import site_window, window_to_dict

OPSET = 20
TORCH_TOLERANCE = 1e-4  # relative to the output scale; observed differences are ~1e-7

DESCRIPTIONS = {
    "traffic": "Next-window mean speed (m/s) of all vehicles on a two-direction urban street and "
               "its congestion level (0 free, 1 slowing, 2 congested: below 80 % / 50 % of the "
               "site's free-flow speed), from the current and recent windows' flow, speeds and "
               "loop occupancy, time of day and week, and the BME280's temperature and humidity.",
    "energy": "Next-window mean electrical load (W) of a street cabinet (street lighting, two EV "
              "charge points, cabinet heater/fan), from the current and recent windows' load, "
              "the load one day earlier, time of day, week and year, and the temperature. The "
              "anomaly score is |actual - forecast| / scale; above the threshold the window is "
              "flagged.",
}
OUTPUT_UNITS = {"speed_next": "m/s", "congestion_level": "1", "power_next_w": "W"}


def _unit(name: str) -> str:
    base = name.split("_lag", maxsplit=1)[0]
    if base in UNITS:
        return UNITS[base]
    return "1"


def _strip_graph(graph: Any) -> None:
    graph.doc_string = ""
    del graph.metadata_props[:]
    for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in seq:
            item.doc_string = ""
            del item.metadata_props[:]
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_graph(attr.g)
            for sub in attr.graphs:
                _strip_graph(sub)


def strip_provenance(model: Any) -> None:
    """Remove doc strings and metadata from the model, its graphs, nodes, values and
    functions (in place); only what onnxruntime needs to run it is left."""
    model.doc_string = ""
    del model.metadata_props[:]
    _strip_graph(model.graph)
    for fn in model.functions:
        fn.doc_string = ""
        del fn.metadata_props[:]
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]


def export_onnx(graph: Any, n_inputs: int, inputs: list[str], outputs: list[str],
                path: Path) -> None:
    import onnx
    import torch

    example = (torch.zeros(4, n_inputs),)
    program = torch.onnx.export(
        graph, example, dynamo=True, external_data=False, opset_version=OPSET,
        input_names=["features"], output_names=outputs,
        dynamic_shapes={"features": {0: torch.export.Dim("batch")}}, verbose=False,
    )
    assert program is not None
    model = program.model_proto
    model.producer_name = "edge-agent models.export"
    strip_provenance(model)
    for key, value in ((META_INPUTS, inputs), (META_OUTPUTS, outputs)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def max_deviation(graph: Any, path: Path, x: np.ndarray) -> float:
    """Largest |onnxruntime - torch| over all outputs, relative to the output's spread."""
    import torch

    sess = ort.InferenceSession(str(path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"features": x})
    with torch.no_grad():
        want = graph(torch.from_numpy(x))
    want = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        ref = w.numpy()
        scale = max(float(np.std(ref)), 1.0)
        worst = max(worst, float(np.max(np.abs(g - ref))) / scale)
    return worst


def export_trained(trained: Trained, out_dir: Path) -> Manifest:
    md = trained.data
    spec = md.spec
    path = out_dir / f"{trained.name}.onnx"
    names = list(spec.names)
    export_onnx(trained.graph, len(names), names, trained.output_names, path)
    probe = md.x[md.split == (2 if (md.split == 2).any() else 1)][:4096]
    deviation = max_deviation(trained.graph, path, probe)
    if not deviation < TORCH_TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime deviates from torch by {deviation:.3g}")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    outputs = []
    for o in trained.output_names:
        labels = ["free", "slowing", "congested"] if o == "congestion_level" else []
        outputs.append({"name": o, "unit": OUTPUT_UNITS[o], "labels": labels})
    manifest = Manifest.model_validate({
        "name": trained.name, "version": digest[:VERSION_CHARS], "sha256": digest,
        "file": path.name, "opset": OPSET, "description": DESCRIPTIONS[trained.name],
        "window_s": spec.window_s, "timezone": spec.timezone, "hold_s": dict(spec.hold_s),
        "inputs": [{"name": i.name, "unit": _unit(i.name), "fill": round(float(i.fill), 6),
                    "range": span}
                   for i, span in zip(spec.inputs, input_ranges(md.x[md.split == 0]),
                                      strict=True)],
        "outputs": outputs,
        "forecast": dict(zip(("output", "actual"), FORECASTS[trained.name], strict=True)),
        **trained.extra,
        "training": {**trained.training, "onnx_vs_torch_max_rel_dev": float(f"{deviation:.3g}"),
                     "size_bytes": len(data)},
        "metrics": trained.metrics,
    })
    man_path = out_dir / f"{trained.name}.json"
    man_path.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n", encoding="utf-8")
    verify(path, man_path)
    return manifest


def _sample_start(trained: Trained, data: SiteData, count: int) -> int:
    """A stretch inside one test week that starts at 04:00 on a weekday (a full day of peaks)."""
    md = trained.data
    test_ts = md.ts_s[md.split == 2]
    first = int(np.flatnonzero(data.ts_s == test_ts[0])[0])
    steps_day = 86_400 // data.window_s
    for day in range(1, 6):
        i = first + day * steps_day
        if i + count < len(data) and data.ts_s[i + count] in set(test_ts.tolist()):
            return i
    return first


def write_samples(trained: Trained, data: SiteData, path: Path, manifest: Manifest) -> None:
    """Sample windows from the test weeks with the outputs the exported graph gives for them:
    enough windows to fill the model's longest lag, plus half a day."""
    from agent.pipeline.features import (
        WEATHER_QUANTITIES,
        WINDOW_QUANTITIES,
        feature_matrix,
        parse_input,
    )
    from models.dataset import quantities

    count = max(parse_input(n)[1] for n in trained.data.spec.names) + 144

    start = _sample_start(trained, data, count)
    stream = "traffic" if trained.name == "traffic" else "cabinet"
    windows = [site_window(data, i, trained.name, stream) for i in range(start, start + count)]
    q = quantities(data)
    keys = WINDOW_QUANTITIES + WEATHER_QUANTITIES
    rows = [{k: float(q[k][i]) for k in keys} for i in range(start, start + count)]
    x = feature_matrix(trained.data.spec, (data.ts_s[start : start + count] * 1_000_000_000)
                       .tolist(), rows)
    sess = ort.InferenceSession(str(path.parent.parent / manifest.file),
                                sess_options=session_options(), providers=["CPUExecutionProvider"])
    out = sess.run([o.name for o in manifest.outputs], {"features": x})
    expected = [
        {o.name: float(out[k][j, 0]) for k, o in enumerate(manifest.outputs)} for j in range(count)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": trained.name, "stream": stream, "version": manifest.version,
        "note": "windows of the simulated site's test weeks; expected = graph outputs per window",
        "windows": [window_to_dict(w) for w in windows],
        "expected": [{k: (None if math.isnan(v) else round(v, 5)) for k, v in e.items()}
                     for e in expected],
    }
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
