"""The numpy executor's run plans: the same results as interpreting the graph node by node, on
every shipped model and on a graph of every operator, and no state carried between runs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from models import SHIPPED
from models.manifest import shipped_paths
from models.numpy_exec import PLANS_KEPT, GraphError, NumpySession
from tests.test_numpy_exec import rows


def _both(session: NumpySession, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    interpreted, _ = session._interpret(names, {session.get_inputs()[0].name: x})
    session.run(names, {session.get_inputs()[0].name: x})  # builds the plan for this shape
    planned = session.run(names, {session.get_inputs()[0].name: x})
    return interpreted, planned


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("batch", [1, 7])
def test_a_plan_gives_what_interpreting_gives(name: str, batch: int) -> None:
    session = NumpySession.from_path(shipped_paths(name)[0])
    for x in rows(shipped_paths(name)[0], 64)[:batch * 9].reshape(9, batch, -1):
        interpreted, planned = _both(session, x)
        assert len(session._plans) == 1
        for a, b in zip(interpreted, planned, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_outputs_are_not_overwritten_by_the_next_run() -> None:
    session = NumpySession.from_path(shipped_paths("energy")[0])
    x = rows(shipped_paths("energy")[0], 4)
    names = [o.name for o in session.get_outputs()]
    first = [session.run(names, {"features": x[i : i + 1]}) for i in range(4)]
    again = [session.run(names, {"features": x[i : i + 1]}) for i in range(4)]
    assert any(not np.array_equal(first[0][0], f[0]) for f in first[1:])
    for a, b in zip(first, again, strict=True):  # the very first run is interpreted
        for u, v in zip(a, b, strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-6)


def test_plans_are_bounded_and_other_shapes_still_run() -> None:
    session = NumpySession.from_path(shipped_paths("traffic")[0])
    x = rows(shipped_paths("traffic")[0], 16)
    for n in range(1, PLANS_KEPT + 4):
        out = session.run(None, {"features": x[:n]})
        assert out[0].shape[0] == n
    assert len(session._plans) == PLANS_KEPT


def test_a_wrong_output_name_is_refused_on_the_planned_path_too() -> None:
    session = NumpySession.from_path(shipped_paths("traffic")[0])
    x = rows(shipped_paths("traffic")[0], 1)[:1]
    session.run(None, {"features": x})
    with pytest.raises(GraphError, match="not in the graph"):
        session.run(["nope"], {"features": x})


def test_runs_from_two_threads_do_not_mix(tmp_path: Path) -> None:
    """A plan's arrays are shared; a second thread meanwhile is interpreted, not corrupted."""
    session = NumpySession.from_path(shipped_paths("energy")[0])
    x = rows(shipped_paths("energy")[0], 64)
    want = [session._interpret([o.name for o in session.get_outputs()],
                               {"features": x[i : i + 1]})[0][0] for i in range(len(x))]
    bad: list[int] = []

    def worker(offset: int) -> None:
        for k in range(300):
            i = (k + offset) % len(x)
            got = session.run(None, {"features": x[i : i + 1]})[0]
            if not np.allclose(got, want[i], rtol=1e-6, atol=1e-6):
                bad.append(i)

    threads = [threading.Thread(target=worker, args=(o,)) for o in (0, 17, 33)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and bad == []


def test_an_intermediate_a_plan_folded_away_can_still_be_asked_for() -> None:
    session = NumpySession.from_path(shipped_paths("traffic")[0])
    x = rows(shipped_paths("traffic")[0], 1)[:1]
    session.run(None, {"features": x})
    sigmoids = [n.outputs[0] for n in session._nodes if n.op == "Sigmoid"]
    plan = next(iter(session._plans.values()))
    assert sigmoids and not any(s in plan.values for s in sigmoids)  # fused into SiLU
    got = session.run(sigmoids[:1], {"features": x})[0]
    assert got.shape == (1, 96) and np.all((got > 0) & (got < 1))


@pytest.mark.parametrize("batch", [1, 5])
def test_chained_gemms_and_a_sigmoid_times_something_else(tmp_path: Path, batch: int) -> None:
    """Shapes the shipped graphs do not have: a Gemm feeding a Gemm (both biases folded through
    ones columns, the inner one written into a widened array), a Gemm read by a SiLU and by a
    graph output (not halved), and x * Sigmoid(y): the plan against onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    f = onnx.TensorProto.FLOAT
    rng = np.random.default_rng(11)

    def const(name: str, *shape: int) -> onnx.TensorProto:
        return helper.make_tensor(name, f, list(shape), rng.normal(0, 0.5, shape).ravel())

    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"]),
        helper.make_node("Sigmoid", ["h2"], ["s2"]),
        helper.make_node("Mul", ["s2", "h2"], ["silu"]),
        helper.make_node("Sigmoid", ["features"], ["sf"]),
        helper.make_node("Gemm", ["silu", "w3", "b3"], ["y"]),
        helper.make_node("Mul", ["sf", "features"], ["gate"]),
        helper.make_node("Less", ["y", "zero"], ["neg"]),
        helper.make_node("Cast", ["neg"], ["negf"], to=f),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("features", f, ["batch", 3])],
        [helper.make_tensor_value_info(n, f, ["batch", k])
         for n, k in (("y", 2), ("h2", 4), ("gate", 3), ("negf", 2))],
        [const("w1", 5, 3), const("b1", 5), const("w2", 5, 4), const("b2", 1, 4),
         const("w3", 4, 2), const("b3", 2), helper.make_tensor("zero", f, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ours = NumpySession(data)
    x = rng.normal(0, 2, (batch, 3)).astype(np.float32)
    for _ in ("interpreted", "planned", "planned again"):
        for got, want in zip(ours.run(None, {"features": x}), ref.run(None, {"features": x}),
                             strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    plan = next(iter(ours._plans.values()))
    assert {"h1", "silu"} <= set(plan._augmented) and "h2" not in plan._halved
