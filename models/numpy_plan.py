"""A run plan for the numpy executor: the graph bound, for one input shape, to preallocated
arrays.

Interpreting a graph node by node costs a dict lookup, a call and a fresh array per node, which
for the gateway's tiny models is more than the arithmetic. A plan is built once per input shape
(from one interpreted run, which gives every intermediate's shape and dtype): each node writes
into its own array with ``out=``, a Slice becomes a view made once, an Identity an alias, and a
run is a flat list of bound calls over fixed arrays. Results are those of the interpreter; the
operators without an ``out=`` form run as in the interpreter and are copied into their array.

A graph whose intermediate shapes could depend on the input's values (a Slice with computed
bounds) gets no plan and is always interpreted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

Step = Callable[[], Any]
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
                 inputs: Mapping[str, np.ndarray], trial: Mapping[str, np.ndarray],
                 ops: Mapping[str, Callable[..., np.ndarray]]) -> None:
        """``trial`` is every value of one interpreted run on ``inputs`` (shapes and dtypes)."""
        self.feeds = {name: np.empty_like(arr) for name, arr in inputs.items()}
        self._constants = constants
        values: dict[str, np.ndarray | None] = {**constants, **self.feeds, "": None}
        self.steps: list[Step] = []
        for node in nodes:
            args = [values[i] for i in node.inputs]
            while args and args[-1] is None:
                args.pop()
            values[node.outputs[0]] = self._bind(node, args, trial[node.outputs[0]], ops)
        self.values = values

    def _bind(self, node: Any, args: list[Any], like: np.ndarray,
              ops: Mapping[str, Callable[..., np.ndarray]]) -> np.ndarray:
        op, attrs, steps = node.op, node.attrs, self.steps
        if op == "Identity":
            return np.asarray(args[0])
        if op == "Slice":  # bounds are constants (see plannable): a view, made once
            view: np.ndarray = ops["Slice"](*args)
            return view
        out = np.empty_like(like)
        ufunc = _ELEMENTWISE.get(op)
        if op == "Div" and not np.issubdtype(like.dtype, np.integer):
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
            steps.append(partial(np.maximum, args[0], np.zeros((), like.dtype), out=out))
        elif op == "Cast":
            steps.append(partial(np.copyto, out, args[0], casting="unsafe"))
        else:  # Clip, Gather and the integer ops: as interpreted, then copied in place
            steps.append(partial(_into, out, ops[op], args, attrs))
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
            np.copyto(buf, feeds[name])
        for step in self.steps:
            step()
        values = self.values
        return [np.array(values[n]) for n in names]


def _into(out: np.ndarray, fn: Callable[..., np.ndarray], args: list[Any],
          attrs: dict[str, Any]) -> None:
    np.copyto(out, fn(*args, **attrs))
