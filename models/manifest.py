"""Model manifests and the checks a model file must pass before the gateway runs it.

Each shipped model is ``<name>.onnx`` plus ``<name>.json``. The manifest names the inputs in
order (with units and the fill value used when an input is missing), the outputs, the opset,
the sha256 of the ONNX file, how the model was trained and how it scored. ``verify`` refuses a
model whose file does not hash to the manifest, whose graph carries other input names, another
input width, another opset, or that its runtime cannot load. Needs no torch and no onnx
package: the few ModelProto fields checked here are read straight from the protobuf.

Runtimes: the numpy executor in ``models.numpy_exec`` for every graph it runs (all the shipped,
calibrated and retrained ones), onnxruntime for any other graph (32-bit Raspberry Pi OS has no
onnxruntime wheel). ``runtime`` picks one explicitly; onnxruntime is imported only when a model
is opened with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models import MODELS_DIR
from models.numpy_exec import GraphError, NumpySession, proto_fields

if TYPE_CHECKING:
    import onnxruntime as ort

OPSET_MIN = 17
OPSET_MAX = 21
META_INPUTS = "edge_agent.inputs"
META_OUTPUTS = "edge_agent.outputs"
VERSION_CHARS = 12


class ModelError(Exception):
    """A model that must not run; the message names the file and what is wrong."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputEntry(_Frozen):
    name: str
    unit: str
    fill: float
    # The span of the training data (low and high percentile); a value outside is flagged.
    range: tuple[float, float] | None = None


class OutputEntry(_Frozen):
    name: str
    unit: str
    labels: list[str] = Field(default_factory=list)  # class names for a class-index output


class Congestion(_Frozen):
    """Congestion level from the predicted speed relative to the site's free-flow speed."""

    output: str
    free_flow_speed_m_s: float
    slowing_below: float  # fraction of free-flow speed
    congested_below: float


class Anomaly(_Frozen):
    """Score = |actual - forecast made one window earlier| / scale; anomalous above threshold."""

    forecast: str  # output name
    actual: str  # the window quantity it forecasts
    scale: float = Field(gt=0)
    threshold: float = Field(gt=0)


class Forecast(_Frozen):
    """Which output forecasts which window quantity, for the skill guard: persistence is the
    current window's ``actual`` (also an input of the same name)."""

    output: str
    actual: str


class Manifest(_Frozen):
    schema_version: int = 1
    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    file: str
    opset: int
    description: str
    input_tensor: str = "features"
    window_s: int = Field(gt=0)
    timezone: str = "UTC"
    hold_s: dict[str, float] = Field(default_factory=dict)
    inputs: list[InputEntry] = Field(min_length=1)
    outputs: list[OutputEntry] = Field(min_length=1)
    congestion: Congestion | None = None
    anomaly: Anomaly | None = None
    forecast: Forecast | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]


Runtime = Literal["auto", "onnxruntime", "numpy"]
RUNTIMES: tuple[Runtime, ...] = ("auto", "onnxruntime", "numpy")


class Session(Protocol):
    """What the gateway uses of a runtime's session (onnxruntime's or the numpy executor's)."""

    def get_inputs(self) -> Any: ...
    def get_outputs(self) -> Any: ...
    def run(self, names: Any, feeds: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class VerifiedModel:
    manifest: Manifest
    path: Path
    session: Session
    runtime: str = "onnxruntime"  # which runtime opened it: "onnxruntime" or "numpy"

    @property
    def version(self) -> str:
        return self.manifest.version


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level protobuf fields as (number, value); ints for varints, bytes for the rest
    (the numpy executor's wire reader)."""
    try:
        return [(number, value) for number, _wire, value in proto_fields(buf)]
    except GraphError as exc:
        raise ValueError(str(exc)) from None


def read_model_header(data: bytes) -> tuple[dict[str, int], dict[str, str]]:
    """(opset by domain, metadata_props) of an ONNX ModelProto."""
    opsets: dict[str, int] = {}
    meta: dict[str, str] = {}
    for number, value in _fields(data):
        if number == 8 and isinstance(value, bytes):  # opset_import
            sub = dict(_fields(value))
            domain = sub.get(1, b"")
            version = sub.get(2, 0)
            if isinstance(domain, bytes) and isinstance(version, int):
                opsets[domain.decode() or "ai.onnx"] = version
        elif number == 14 and isinstance(value, bytes):  # metadata_props
            sub = dict(_fields(value))
            k, v = sub.get(1, b""), sub.get(2, b"")
            if isinstance(k, bytes) and isinstance(v, bytes):
                meta[k.decode()] = v.decode()
    if "ai.onnx" not in opsets:
        raise ValueError("no default-domain opset_import")
    return opsets, meta


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read manifest: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: manifest is not valid JSON: {exc}") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"{path}: manifest field {where}: {first['msg']}") from None


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def session_options() -> ort.SessionOptions:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def shipped_paths(name: str) -> tuple[Path, Path]:
    return MODELS_DIR / f"{name}.onnx", MODELS_DIR / f"{name}.json"


def manifest_path_for(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def open_session(data: bytes, runtime: Runtime, where: Path) -> tuple[Session, str]:
    """A session on the graph in ``data`` and the name of the runtime that opened it.

    ``auto`` takes the numpy executor for a graph it runs (for the gateway's small models it is
    about as fast as onnxruntime, and the process stays 30 MiB smaller without onnxruntime
    loaded) and onnxruntime for any other graph."""
    if runtime not in RUNTIMES:
        raise ModelError(f"{where}: unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")
    if runtime != "onnxruntime":
        try:
            return NumpySession(data), "numpy"
        except GraphError as exc:
            if runtime == "numpy" or not onnxruntime_available():
                hint = "" if runtime == "numpy" else " (onnxruntime is not installed here)"
                raise ModelError(f"{where}: the numpy executor cannot run it{hint}: "
                                 f"{exc}") from None
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError(f"{where}: runtime 'onnxruntime' is configured but cannot be imported "
                         f"({exc}); install onnxruntime or set runtime = \"numpy\"") from None
    try:
        session = ort.InferenceSession(data, sess_options=session_options(),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own non-exported exception types
        raise ModelError(f"{where}: onnxruntime cannot load it: {exc}") from None
    return session, "onnxruntime"


def verify(onnx_path: str | Path, manifest_path: str | Path | None = None,
           runtime: Runtime = "auto") -> VerifiedModel:
    """Check an ONNX file against its manifest and open it with ``runtime`` ("auto": the numpy
    executor if it runs the graph, else onnxruntime); raises ModelError on any mismatch."""
    onnx_path = Path(onnx_path)
    m = load_manifest(manifest_path or manifest_path_for(onnx_path))
    try:
        data = onnx_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{onnx_path}: cannot read model: {exc.strerror}") from None
    digest = sha256_bytes(data)
    if digest != m.sha256:
        raise ModelError(
            f"{onnx_path}: sha256 {digest[:16]}... does not match the manifest's "
            f"{m.sha256[:16]}... (corrupt or replaced file)"
        )
    if m.version != digest[:VERSION_CHARS]:
        raise ModelError(f"{onnx_path}: manifest version {m.version!r} is not the sha256 prefix")
    try:
        opsets, meta = read_model_header(data)
    except ValueError as exc:
        raise ModelError(f"{onnx_path}: not an ONNX model: {exc}") from None
    opset = opsets["ai.onnx"]
    if opset != m.opset:
        raise ModelError(f"{onnx_path}: graph opset {opset} but the manifest says {m.opset}")
    if not OPSET_MIN <= opset <= OPSET_MAX:
        raise ModelError(
            f"{onnx_path}: opset {opset} is outside what this gateway runs "
            f"({OPSET_MIN}..{OPSET_MAX})"
        )
    graph_inputs = _meta_list(meta, META_INPUTS, onnx_path)
    if graph_inputs != m.input_names:
        diff = [f"{i}: graph {g!r} vs manifest {n!r}" for i, (g, n) in
                enumerate(zip(graph_inputs, m.input_names, strict=False)) if g != n]
        raise ModelError(
            f"{onnx_path}: input names differ from the graph ({len(graph_inputs)} in graph, "
            f"{len(m.input_names)} in manifest; {'; '.join(diff[:3]) or 'length differs'})"
        )
    session, used = open_session(data, runtime, onnx_path)
    _check_graph(session, m, onnx_path)
    return VerifiedModel(m, onnx_path, session, used)


def _meta_list(meta: dict[str, str], key: str, where: Path) -> list[str]:
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise ModelError(f"{where}: graph carries no {key!r} metadata") from None
    except json.JSONDecodeError:
        raise ModelError(f"{where}: graph metadata {key!r} is not JSON") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelError(f"{where}: graph metadata {key!r} is not a list of names")
    return value


def _check_graph(session: Session, m: Manifest, where: Path) -> None:
    ins = session.get_inputs()
    if len(ins) != 1 or ins[0].name != m.input_tensor:
        raise ModelError(f"{where}: graph inputs {[i.name for i in ins]} but the manifest "
                         f"expects one tensor {m.input_tensor!r}")
    shape = ins[0].shape
    if len(shape) != 2 or shape[1] != len(m.inputs):
        raise ModelError(f"{where}: input tensor shape {shape} does not take the manifest's "
                         f"{len(m.inputs)} inputs")
    if ins[0].type != "tensor(float)":
        raise ModelError(f"{where}: input tensor type {ins[0].type}, expected tensor(float)")
    outs = {o.name for o in session.get_outputs()}
    missing = [o.name for o in m.outputs if o.name not in outs]
    if missing:
        raise ModelError(f"{where}: outputs {missing} are not in the graph ({sorted(outs)})")
    probe = np.array([[i.fill for i in m.inputs]], dtype=np.float32)
    try:
        result = session.run([o.name for o in m.outputs], {m.input_tensor: probe})
    except Exception as exc:
        raise ModelError(f"{where}: a probe run failed: {exc}") from None
    if not all(np.all(np.isfinite(np.asarray(r))) for r in result):
        raise ModelError(f"{where}: a probe run on the fill values gave non-finite outputs")
