"""The chaos summary: one row per fault, printed when the module that ran them ends.

Columns: accepted, received, lost (accepted but never received), duplicated (deliveries beyond
the first of a msg_id), and time to recover: from the fault's end (e.g. "the broker accepts
connections again") to the first sign the agent is whole again (e.g. the first PUBACK).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

Row = tuple[str, int, int, int, int, str, str]
ROWS: list[Row] = []


def add(fault: str, accepted: int, received: int, lost: int, duplicated: int,
        recover: str = "", note: str = "") -> None:
    ROWS.append((fault, accepted, received, lost, duplicated, recover, note))


def seconds(values: list[float]) -> str:
    """``p50 / p95 / max`` of recovery times in seconds (one value: just it)."""
    if not values:
        return "-"
    v = sorted(values)
    if len(v) == 1:
        return f"{v[0]:.2f} s"
    p95 = v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]
    return f"{v[len(v) // 2]:.2f}/{p95:.2f}/{v[-1]:.2f} s"


def p95(values: list[float]) -> float:
    """The nearest-rank 95th percentile."""
    v = sorted(values)
    return v[min(len(v) - 1, -(-95 * len(v) // 100) - 1)]


@contextlib.contextmanager
def printed(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the rows added inside the block (a module's faults) when it ends."""
    start = len(ROWS)
    yield
    rows = ROWS[start:]
    if not rows:
        return
    lines = [f"{'fault':34s} {'accepted':>9s} {'received':>9s} {'lost':>5s} {'dup':>5s} "
             f"{'time to recover':>22s}  note"]
    lines += [f"{f:34s} {a:9d} {r:9d} {lo:5d} {d:5d} {t:>22s}  {n}"
              for f, a, r, lo, d, t, n in rows]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n\nchaos summary (time to recover: p50/p95/max over the repeats)\n"
              + "\n".join(lines), flush=True)
