"""A run plan for the numpy executor: the graph bound, for one input shape, to preallocated
arrays.

Interpreting a graph node by node costs a dict lookup, a call and a fresh array per node, which
for the gateway's tiny models is more than the arithmetic. A plan is built once per input shape
(from one interpreted run, which gives every intermediate's shape and dtype): each node writes
into its own array with ``out=``, a Slice becomes a view made once, an Identity an alias, and a
run is a flat list of bound calls over fixed arrays. The operators without an ``out=`` form run
as in the interpreter and are copied into their array.

Fewer calls where the graph allows, each giving what the nodes it replaces give:

- ``x * Sigmoid(x)`` (SiLU) is one sequence of three or four calls instead of five (three
  when x comes from a Gemm, whose weights then give x / 2 exactly);
- a comparison feeding only a Cast to a number writes the number directly;
- a Gemm with constant B and C whose input array is written only by the plan reads that array
  with a column of ones appended and B with C as its last row, so the bias costs no call.

A graph whose intermediate shapes could depend on the input's values (a Slice with computed
bounds) gets no plan and is always interpreted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

Step = Callable[[], Any]
Ops = Mapping[str, Callable[..., np.ndarray]]
_ELEMENTWISE: dict[str, Any] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "MatMul": np.matmul,
    "Less": np.less, "Greater": np.greater, "Neg": np.negative, "Abs": np.abs, "Tanh": np.tanh,
}
_HALF = np.float32(0.5)


def plannable(ops: Sequence[tuple[str, tuple[str, ...]]], constants: Mapping[str, Any]) -> bool:
    """Whether every intermediate shape follows from the input shape alone."""
    return all(all(i in constants or not i for i in inputs[1:])
               for op, inputs in ops if op == "Slice")


class Plan:
    """Runs one graph on inputs of one shape and dtype; not reentrant (the session holds a lock
    around it)."""

    def __init__(self, nodes: Sequence[Any], constants: Mapping[str, np.ndarray],
                 inputs: Mapping[str, np.ndarray], trial: Mapping[str, np.ndarray], *,
                 ops: Ops, outputs: Sequence[str]) -> None:
        """``trial`` is every value of one interpreted run on ``inputs`` (shapes and dtypes)."""
        self.feeds = {name: np.empty_like(arr) for name, arr in inputs.items()}
        self._constants, self._trial = constants, trial
        self._uses = Counter(i for n in nodes for i in n.inputs)
        self._uses.update(outputs)  # a graph output is read by the caller
        self._readers: dict[str, list[Any]] = {}
        for n in nodes:
            for i in n.inputs:
                self._readers.setdefault(i, []).append(n)
        self._augmented: dict[str, np.ndarray] = {}  # value -> its array with a ones column
        self._halved: set[str] = set()  # values whose array holds half of them (see _fuse)
        self._done: set[int] = set()
        values: dict[str, np.ndarray | None] = {**constants, **self.feeds, "": None}
        self.steps: list[Step] = []
        for k, node in enumerate(nodes):
            if k in self._done:
                continue
            args = [values[i] for i in node.inputs]
            while args and args[-1] is None:
                args.pop()
            fused = self._fuse(node, nodes[k + 1:], values)
            if fused is not None:
                later, out = fused
                self._done.add(k + 1 + later)
                values[nodes[k + 1 + later].outputs[0]] = out
                continue
            values[node.outputs[0]] = self._bind(node, args, ops)
        self.values = values
        self.names = frozenset(k for k, v in values.items() if v is not None)

    def _buffer(self, name: str) -> np.ndarray:
        """The array a node writes ``name`` into; a Gemm reader may get it widened (see
        ``_gemm``)."""
        like = self._trial[name]
        readers = self._readers.get(name, [])
        if (like.ndim == 2 and like.dtype == np.float32 and readers
                and self._uses[name] == len(readers)
                and all(self._bias_gemm(r) and r.inputs[0] == name for r in readers)):
            wide = np.ones((like.shape[0], like.shape[1] + 1), dtype=like.dtype)
            self._augmented[name] = wide
            return wide[:, :-1]
        return np.empty_like(like)

    def _silu_only(self, name: str) -> bool:
        """Whether ``name`` is read only by a ``name * Sigmoid(name)`` pair."""
        readers = self._readers.get(name, [])
        if self._uses[name] != 2 or len(readers) != 2:
            return False
        sig = next((r for r in readers if r.op == "Sigmoid"), None)
        mul = next((r for r in readers if r.op == "Mul"), None)
        return (sig is not None and mul is not None and self._uses[sig.outputs[0]] == 1
                and sorted(mul.inputs) == sorted((name, sig.outputs[0])))

    def _bias_gemm(self, node: Any) -> bool:
        a = node.attrs
        c = self._constants.get(node.inputs[2]) if len(node.inputs) == 3 else None
        return (node.op == "Gemm" and c is not None and node.inputs[1] in self._constants
                and (c.ndim <= 1 or c.shape[0] == 1)
                and not a.get("transA", 0) and a.get("alpha", 1.0) == 1.0
                and a.get("beta", 1.0) == 1.0)

    def _fuse(self, node: Any, rest: Sequence[Any], values: dict[str, np.ndarray | None]
              ) -> tuple[int, np.ndarray] | None:
        """(index in ``rest`` of the node folded in, its output array), or None."""
        out_name = node.outputs[0]
        if self._uses[out_name] != 1:
            return None
        later = next((k for k, r in enumerate(rest) if out_name in r.inputs), None)
        if later is None:
            return None
        reader = rest[later]
        if node.op == "Sigmoid" and reader.op == "Mul" and \
                sorted(reader.inputs) == sorted((node.inputs[0], out_name)):
            x, out = values[node.inputs[0]], self._buffer(reader.outputs[0])
            # x * sigmoid(x) = z + z * tanh(z), z = x / 2 (which a halved Gemm wrote already)
            z = x if node.inputs[0] in self._halved else np.empty_like(out)
            if z is not x:
                self.steps.append(partial(np.multiply, x, _HALF, out=z))
            self.steps += [partial(np.tanh, z, out=out), partial(np.multiply, out, z, out=out),
                           partial(np.add, out, z, out=out)]
            return later, out
        if node.op in ("Less", "Greater") and reader.op == "Cast":
            out = self._buffer(reader.outputs[0])
            if not np.issubdtype(out.dtype, np.number):
                return None
            a, b = (values[i] for i in node.inputs)
            self.steps.append(partial(_ELEMENTWISE[node.op], a, b, out=out, casting="unsafe"))
            return later, out
        return None

    def _bind(self, node: Any, args: list[Any], ops: Ops) -> np.ndarray:
        op, attrs, steps = node.op, node.attrs, self.steps
        if op == "Identity":
            return np.asarray(args[0])
        if op == "Slice":  # bounds are constants (see plannable): a view, made once
            view: np.ndarray = ops["Slice"](*args)
            return view
        if op == "Gemm" and node.inputs[0] in self._augmented:
            return self._gemm_augmented(node, args)
        out = self._buffer(node.outputs[0])
        ufunc = _ELEMENTWISE.get(op)
        if op == "Div" and not np.issubdtype(out.dtype, np.integer):
            ufunc = np.divide
        if ufunc is not None:
            steps.append(partial(ufunc, *args, out=out))
        elif op == "Gemm":
            self._gemm(out, *args, weight=node.inputs[1] in self._constants, **attrs)
        elif op == "Sigmoid":
            steps += [partial(np.multiply, args[0], _HALF, out=out), partial(np.tanh, out, out=out),
                      partial(np.multiply, out, _HALF, out=out),
                      partial(np.add, out, _HALF, out=out)]
        elif op == "Relu":
            steps.append(partial(np.maximum, args[0], np.zeros((), out.dtype), out=out))
        elif op == "Cast":
            steps.append(partial(np.copyto, out, args[0], casting="unsafe"))
        elif op == "Clip" and out.dtype.kind == "f":  # as the interpreter: NaN stays NaN
            lo, hi = [*args, None, None][1:3]
            src = args[0]
            for bound, ufunc in ((lo, np.maximum), (hi, np.minimum)):
                if bound is not None:
                    steps.append(partial(ufunc, src, bound, out=out))
                    src = out
            if src is not out:
                steps.append(partial(np.copyto, out, src))
        else:  # Gather and the integer ops: as interpreted, then copied in place
            steps.append(partial(_into, out, ops[op], args, attrs))
        return out

    def _gemm_augmented(self, node: Any, args: list[Any]) -> np.ndarray:
        """A + B + C as one product: [A, 1] @ [B; C] (A's array has the ones column)."""
        b, c = args[1], args[2]
        b = b.T if node.attrs.get("transB", 0) else b
        out = self._buffer(node.outputs[0])
        weight = np.ascontiguousarray(np.vstack([b, np.broadcast_to(c, (1, b.shape[1]))]),
                                      dtype=b.dtype)
        if self._silu_only(node.outputs[0]) and weight.dtype.kind == "f":
            weight *= 0.5  # a power of two: the product is exactly half of what it was
            self._halved.add(node.outputs[0])
        self.steps.append(partial(np.matmul, self._augmented[node.inputs[0]], weight, out=out))
        return out

    def _gemm(self, out: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None,
              *, weight: bool, alpha: float = 1.0, beta: float = 1.0, transA: int = 0,
              transB: int = 0) -> None:
        a = a.T if transA else a
        b = b.T if transB else b
        if weight:  # a constant: laid out once in the order the product reads it
            b = np.ascontiguousarray(b)
        self.steps.append(partial(np.matmul, a, b, out=out))
        if alpha != 1.0:
            self.steps.append(partial(np.multiply, out, np.float32(alpha), out=out))
        if c is not None:
            if beta != 1.0:
                scaled = np.empty(np.broadcast_shapes(np.shape(c), ()), dtype=np.asarray(c).dtype)
                self.steps.append(partial(np.multiply, c, np.float32(beta), out=scaled))
                c = scaled
            self.steps.append(partial(np.add, out, c, out=out))

    def run(self, feeds: Mapping[str, Any], names: Sequence[str]) -> list[np.ndarray]:
        for name, buf in self.feeds.items():
            buf[...] = feeds[name]
        for step in self.steps:
            step()
        values = self.values
        return [np.array(values[n]) for n in names]


def _into(out: np.ndarray, fn: Callable[..., np.ndarray], args: list[Any],
          attrs: dict[str, Any]) -> None:
    np.copyto(out, fn(*args, **attrs))
