"""A small numpy executor for the ONNX graphs the gateway runs, for where onnxruntime has no
wheel (32-bit Raspberry Pi OS).

It reads the ModelProto straight from the protobuf wire format (no ``onnx`` package), keeps the
initializers as numpy arrays and runs the nodes in their stored order, which ONNX requires to be
topological. Only the operators the shipped, calibrated and retrained graphs use are
implemented (plus a few elementwise ones of the same kind); a graph with any other operator is
refused when it is opened, naming the operator, never half-way through a run.

The session object answers the part of onnxruntime's ``InferenceSession`` the agent uses:
``get_inputs()``, ``get_outputs()`` and ``run(names, feeds)``. Arithmetic is float32 like
onnxruntime's CPU kernels; results agree to about 1e-6 (tests compare every shipped model).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.numpy_plan import Plan, plannable

_FLOAT32 = np.dtype(np.float32)
PLANS_KEPT = 4  # input shapes with a plan; a caller cycling through more is interpreted

class GraphError(ValueError):
    """The file is not a graph this executor can run; the message says why."""


# TensorProto.DataType -> numpy dtype (the types a feature graph can carry).
DTYPES: dict[int, Any] = {
    1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}
TYPE_NAMES = {1: "float", 6: "int32", 7: "int64", 9: "bool", 11: "double"}


# -- protobuf wire format --------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise GraphError("truncated varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, pos


def proto_fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """One message's fields as (number, wire type, value): ints for varints, bytes otherwise."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, wire, value))
            continue
        size = {1: 8, 5: 4}.get(wire)
        if size is None and wire == 2:
            size, pos = _varint(buf, pos)
        if size is None:
            raise GraphError(f"unsupported protobuf wire type {wire} at byte {pos}")
        if pos + size > len(buf):
            raise GraphError(f"field {number} runs past the end of its message")
        out.append((number, wire, buf[pos : pos + size]))
        pos += size
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(fields: list[tuple[int, int, int | bytes]], number: int) -> list[int]:
    """A repeated int64 field, packed or not."""
    out: list[int] = []
    for n, wire, value in fields:
        if n != number:
            continue
        if isinstance(value, int):
            out.append(_signed(value))
        elif wire == 2:
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                out.append(_signed(v))
    return out


def _floats(fields: list[tuple[int, int, int | bytes]], number: int) -> list[float]:
    """A repeated float field, packed or not."""
    out: list[float] = []
    for n, _wire, value in fields:
        if n == number and isinstance(value, bytes):
            if len(value) % 4:
                raise GraphError("float data is not a whole number of floats")
            out.extend(struct.unpack(f"<{len(value) // 4}f", value))
    return out


def _bytes(fields: list[tuple[int, int, int | bytes]], number: int) -> list[bytes]:
    return [v for n, w, v in fields if n == number and w == 2 and isinstance(v, bytes)]


def _str(fields: list[tuple[int, int, int | bytes]], number: int, default: str = "") -> str:
    found = _bytes(fields, number)
    return found[-1].decode("utf-8", "replace") if found else default


def _int(fields: list[tuple[int, int, int | bytes]], number: int, default: int = 0) -> int:
    found = [v for n, w, v in fields if n == number and w == 0 and isinstance(v, int)]
    return _signed(found[-1]) if found else default


def tensor(buf: bytes) -> tuple[str, np.ndarray]:
    """A TensorProto as (name, array)."""
    f = proto_fields(buf)
    dims = _ints(f, 1)
    dtype_code = _int(f, 2)
    name = _str(f, 8)
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        raise GraphError(f"tensor {name!r}: data type {dtype_code} is not supported")
    if _int(f, 14) == 1 or _bytes(f, 13):
        raise GraphError(f"tensor {name!r}: external data is not supported")
    count = int(np.prod(dims)) if dims else 1
    raw = _bytes(f, 9)
    if raw:
        arr = np.frombuffer(raw[-1], dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    elif dtype_code == 1:
        arr = np.array(_floats(f, 4), dtype=np.float32)
    elif dtype_code == 11:
        arr = np.frombuffer(b"".join(_bytes(f, 10)), dtype="<f8").astype(np.float64)
    elif dtype_code == 7:
        arr = np.array(_ints(f, 7), dtype=np.int64)
    else:  # int32, bools and the small ints live in int32_data
        arr = np.array(_ints(f, 5), dtype=np.int64).astype(dtype)
    if arr.size != count:
        raise GraphError(f"tensor {name!r}: {arr.size} values for shape {dims}")
    return name, arr.reshape(dims)


def _attribute(buf: bytes) -> tuple[str, Any]:
    f = proto_fields(buf)
    name = _str(f, 1)
    kind = _int(f, 20)
    if kind == 1 or (kind == 0 and any(n == 2 for n, _, _ in f)):
        return name, _floats(f, 2)[-1]
    if kind == 2 or (kind == 0 and any(n == 3 for n, _, _ in f)):
        return name, _int(f, 3)
    if kind == 3:
        return name, _bytes(f, 4)[-1].decode("utf-8", "replace")
    if kind == 4:
        return name, tensor(_bytes(f, 5)[-1])[1]
    if kind == 6:
        return name, _floats(f, 7)
    if kind == 7:
        return name, _ints(f, 8)
    raise GraphError(f"attribute {name!r}: type {kind} is not supported")


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    name: str


@dataclass(frozen=True)
class ValueInfo:
    """What ``InferenceSession.get_inputs()`` gives for one graph input or output."""

    name: str
    shape: list[int | str | None]
    type: str


def _value_info(buf: bytes) -> ValueInfo:
    f = proto_fields(buf)
    name = _str(f, 1)
    elem, shape = 0, []
    for t in _bytes(f, 2):  # TypeProto
        for tt in _bytes(proto_fields(t), 1):  # TypeProto.Tensor
            tf = proto_fields(tt)
            elem = _int(tf, 1)
            for sh in _bytes(tf, 2):  # TensorShapeProto
                for dim in _bytes(proto_fields(sh), 1):
                    df = proto_fields(dim)
                    shape.append(_int(df, 1) if any(n == 1 for n, _, _ in df)
                                 else _str(df, 2) or None)
    return ValueInfo(name, shape, f"tensor({TYPE_NAMES.get(elem, str(elem))})")


# -- operators -------------------------------------------------------------------------------

def _gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None, *, alpha: float = 1.0,
          beta: float = 1.0, transA: int = 0, transB: int = 0) -> np.ndarray:
    a = a.T if transA else a
    b = b.T if transB else b
    y = np.matmul(a, b)
    if alpha != 1.0:
        y = y * np.float32(alpha)
    if c is not None:
        y = y + (c * np.float32(beta) if beta != 1.0 else c)
    return np.asarray(y, dtype=a.dtype)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-x)) written through tanh, which cannot overflow (and is what a plan runs)
    half = np.float32(0.5)
    return np.asarray(np.tanh(x * half) * half + half, dtype=x.dtype)


def _clip(x: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None
          ) -> np.ndarray:
    if lo is not None:
        x = np.maximum(x, lo)
    if hi is not None:
        x = np.minimum(x, hi)
    return x


def _slice(x: np.ndarray, starts: np.ndarray, ends: np.ndarray, axes: np.ndarray | None = None,
           steps: np.ndarray | None = None) -> np.ndarray:
    axes_l = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps_l = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index: list[slice] = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes_l, steps_l, strict=True):
        dim = x.shape[axis]
        s, e = int(start), int(end)
        s, e = s + dim if s < 0 else s, e + dim if e < 0 else e
        if step > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
            index[axis] = slice(s, e, step)
        else:  # a negative step ends at -1 meaning "past the first element"
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
            index[axis] = slice(s, None if e < 0 else e, step)
    return x[tuple(index)]


def _gather(x: np.ndarray, idx: np.ndarray, *, axis: int = 0) -> np.ndarray:
    dim = x.shape[axis]
    idx = np.where(idx < 0, idx + dim, idx)
    if np.any((idx < 0) | (idx >= dim)):
        raise GraphError(f"Gather index out of range for a dimension of {dim}")
    return np.take(x, idx, axis=axis)


def _cast(x: np.ndarray, *, to: int) -> np.ndarray:
    dtype = DTYPES.get(to)
    if dtype is None:
        raise GraphError(f"Cast to data type {to} is not supported")
    return x.astype(dtype)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):  # ONNX integer division truncates towards zero
        return np.asarray(np.trunc(a / b), dtype=a.dtype)
    return np.asarray(a / b)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.maximum(x, np.zeros((), x.dtype)))


OPS: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _div,
    "MatMul": np.matmul, "Gemm": _gemm, "Sigmoid": _sigmoid, "Relu": _relu, "Tanh": np.tanh,
    "Clip": _clip, "Slice": _slice, "Gather": _gather, "Cast": _cast, "Identity": np.asarray,
    "Less": np.less, "Greater": np.greater, "Neg": np.negative, "Abs": np.abs,
}
# Attributes each operator takes, and those it is allowed to carry but ignores.
ATTRS: dict[str, set[str]] = {"Gemm": {"alpha", "beta", "transA", "transB"},
                              "Gather": {"axis"}, "Cast": {"to", "saturate"}}


def _node(buf: bytes) -> Node:
    f = proto_fields(buf)
    op = _str(f, 4)
    domain = _str(f, 7)
    name = _str(f, 3) or op
    if domain not in ("", "ai.onnx"):
        raise GraphError(f"node {name!r}: operator domain {domain!r} is not supported")
    if op not in OPS:
        raise GraphError(f"node {name!r}: operator {op} is not supported by the numpy "
                         f"executor (it runs {', '.join(sorted(OPS))})")
    attrs = dict(_attribute(a) for a in _bytes(f, 5))
    unknown = set(attrs) - ATTRS.get(op, set())
    if unknown:
        raise GraphError(f"node {name!r}: {op} attribute(s) {sorted(unknown)} not supported")
    attrs.pop("saturate", None)
    return Node(op, tuple(b.decode() for b in _bytes(f, 1)),
                tuple(b.decode() for b in _bytes(f, 2)), attrs, name)


# -- the session -----------------------------------------------------------------------------

class NumpySession:
    """Runs one ONNX graph with numpy; built from the bytes of a .onnx file."""

    def __init__(self, data: bytes) -> None:
        graphs = [v for n, w, v in proto_fields(data) if n == 7 and w == 2 and isinstance(v, bytes)]
        if not graphs:
            raise GraphError("the model has no graph")
        g = proto_fields(graphs[-1])
        self._constants = dict(tensor(t) for t in _bytes(g, 5))
        self._nodes = [_node(n) for n in _bytes(g, 1)]
        self._inputs = [v for v in (_value_info(b) for b in _bytes(g, 11))
                        if v.name not in self._constants]
        self._outputs = [_value_info(b) for b in _bytes(g, 12)]
        known = set(self._constants) | {i.name for i in self._inputs} | {""}
        for node in self._nodes:
            missing = [i for i in node.inputs if i not in known]
            if missing:
                raise GraphError(f"node {node.name!r} reads {missing}, which nothing before it "
                                 "produces")
            known.update(node.outputs)
        absent = [o.name for o in self._outputs if o.name not in known]
        if absent:
            raise GraphError(f"graph outputs {absent} are produced by no node")
        self._known = frozenset(known)
        self._fed = [(i.name, i.type == "tensor(float)") for i in self._inputs]
        self._output_names = [o.name for o in self._outputs]
        self._plannable = plannable([(n.op, n.inputs) for n in self._nodes], self._constants)
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._lock = threading.Lock()  # a plan's arrays are shared: one run at a time

    @classmethod
    def from_path(cls, path: str | Path) -> NumpySession:
        return cls(Path(path).read_bytes())

    def get_inputs(self) -> list[ValueInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[ValueInfo]:
        return list(self._outputs)

    def run(self, names: Sequence[str] | None, feeds: dict[str, Any]) -> list[np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name, is_float in self._fed:
            if name not in feeds:
                raise GraphError(f"input {name!r} is not fed")
            arr = np.asarray(feeds[name])
            if is_float and arr.dtype != _FLOAT32:
                raise GraphError(f"input {name!r}: expected float32, got {arr.dtype}")
            arrays[name] = arr
        wanted = self._output_names if names is None else names
        if not self._known.issuperset(wanted):
            unknown = [n for n in wanted if n not in self._known]
            raise GraphError(f"outputs {unknown} are not in the graph")
        if not self._plannable or not self._lock.acquire(blocking=False):
            return self._interpret(wanted, arrays)[0]  # busy on another thread: no waiting
        try:
            key = tuple([(a.shape, a.dtype.num) for a in arrays.values()])
            plan = self._plans.get(key)
            if plan is not None and plan.names.issuperset(wanted):
                return plan.run(arrays, wanted)
            if plan is not None:  # an intermediate a plan folded away: interpreted
                return self._interpret(wanted, arrays)[0]
            out, values = self._interpret(wanted, arrays)
            if len(self._plans) < PLANS_KEPT:
                self._plans[key] = Plan(self._nodes, self._constants, arrays, values, ops=OPS,
                                        outputs=self._output_names)
            return out
        finally:
            self._lock.release()

    def _interpret(self, wanted: Sequence[str], feeds: dict[str, np.ndarray]
                   ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """One run node by node: the outputs and every value."""
        values: dict[str, np.ndarray] = {**self._constants, **feeds}
        for node in self._nodes:
            args = [values[i] if i else None for i in node.inputs]
            while args and args[-1] is None:  # trailing optional inputs left out
                args.pop()
            result = OPS[node.op](*args, **node.attrs)
            values[node.outputs[0]] = np.asarray(result)
        return [values[n] for n in wanted], values
