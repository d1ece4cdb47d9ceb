"""A small gradient-boosted tree ensemble as flat leaf tables, for a short site history.

Fourteen days of a site are few rows for the net alone: at chicago-arterial its traffic
forecast beats persistence by 14.1 % and a tree ensemble on the same rows by 13.3 %, but their
errors differ enough that their mean reaches 16.2 % (seville-suburb 28.1 % -> 28.5 %; see the
model card). The trees are fitted with scikit-learn (train extra) and then written out as
tables that a graph evaluates with Gather, Mul, Greater, Cast and MatMul only, so the exported
file runs in onnxruntime and in the gateway's numpy executor alike.

Each leaf is the conjunction of the conditions on its path from the root. With depth ``D``, a
leaf is described by ``D`` rows of (input index, sign, threshold): the condition is
``sign * x[index] > threshold``. A right turn (``x > t``) is sign +1, threshold ``t``; a left
turn (``x <= t``) is sign -1, threshold ``-next_after(t)``, which is ``x < next_after(t)``, the
same as ``x <= t`` on float32 inputs. A leaf shallower than ``D`` is padded with a condition
that always holds. The forecast is ``base + sum over leaves of value * prod(conditions)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TREES = 100
DEPTH = 3
LEARNING_RATE = 0.1
ALWAYS = np.float32(-3.0e38)  # a threshold every finite input exceeds


@dataclass(frozen=True)
class LeafTables:
    index: np.ndarray  # (DEPTH, leaves) int64: the input each path condition reads
    sign: np.ndarray  # (DEPTH, leaves) float32: +1 for x > t, -1 for x <= t
    threshold: np.ndarray  # (DEPTH, leaves) float32
    value: np.ndarray  # (leaves,) float32: learning rate times the leaf's value
    base: float  # the ensemble's constant (its initial estimate)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """What the exported graph computes, in numpy (float32 as in the graph)."""
        xs = x.astype(np.float32)[:, self.index] * self.sign  # (n, DEPTH, leaves)
        on = np.prod((xs > self.threshold).astype(np.float32), axis=1)
        out: np.ndarray = on @ self.value + np.float32(self.base)
        return out


def _paths(tree: object) -> list[list[tuple[int, float, float]]]:
    """For each leaf of a fitted sklearn tree: its (input, sign, threshold) conditions."""
    left, right = tree.children_left, tree.children_right  # type: ignore[attr-defined]
    feature, thr = tree.feature, tree.threshold  # type: ignore[attr-defined]
    out: list[tuple[int, list[tuple[int, float, float]]]] = []
    stack: list[tuple[int, list[tuple[int, float, float]]]] = [(0, [])]
    while stack:
        node, path = stack.pop()
        if left[node] == right[node]:  # a leaf
            out.append((node, path))
            continue
        t = np.float32(thr[node])
        # sklearn sends x <= t left, comparing the float32 input with the float64 threshold;
        # on float32 inputs that is x <= float32(t) rounded down, i.e. x < next float32 up.
        t32 = t if float(t) <= thr[node] else np.nextafter(t, np.float32(-np.inf))
        up = np.nextafter(t32, np.float32(np.inf))
        stack.append((int(left[node]), [*path, (int(feature[node]), -1.0, float(-up))]))
        stack.append((int(right[node]), [*path, (int(feature[node]), 1.0, float(t32))]))
    return [p for _, p in sorted(out)]


def _leaf_values(tree: object) -> list[float]:
    left, right = tree.children_left, tree.children_right  # type: ignore[attr-defined]
    value = tree.value  # type: ignore[attr-defined]
    return [float(value[n].reshape(-1)[0]) for n in range(len(left)) if left[n] == right[n]]


def fit_trees(x: np.ndarray, target: np.ndarray, seed: int = 0) -> LeafTables:
    """Gradient-boosted trees (absolute error: the score is MAE) of ``target`` on ``x``."""
    from sklearn.ensemble import GradientBoostingRegressor

    gbm = GradientBoostingRegressor(loss="absolute_error", n_estimators=TREES, max_depth=DEPTH,
                                    learning_rate=LEARNING_RATE, random_state=seed)
    gbm.fit(x.astype(np.float32), target.astype(np.float64))
    rows: list[list[tuple[int, float, float]]] = []
    values: list[float] = []
    for est in gbm.estimators_[:, 0]:
        rows += _paths(est.tree_)
        values += [LEARNING_RATE * v for v in _leaf_values(est.tree_)]
    pad = [(0, 1.0, float(ALWAYS))]
    full = [p + pad * (DEPTH - len(p)) for p in rows]
    base = float(np.asarray(gbm.init_.predict(x[:1].astype(np.float32))).reshape(-1)[0])
    return LeafTables(
        index=np.array([[c[0] for c in p] for p in full], dtype=np.int64).T.copy(),
        sign=np.array([[c[1] for c in p] for p in full], dtype=np.float32).T.copy(),
        threshold=np.array([[c[2] for c in p] for p in full], dtype=np.float32).T.copy(),
        value=np.array(values, dtype=np.float32), base=base)
