"""Hostile input for the fuzz suite: hypothesis strategies, mutations, and a summary table.

Strategies: JSON a probe would send (huge integers, NaN and Infinity, nesting 10,000 deep
written as raw text, long strings, wrong types, valid-looking objects with one bad field),
bytes that are not UTF-8, and truncation. ``mutations`` turns one drawn input into many cases
(every truncation of it, byte flips, a non-UTF-8 byte spliced in) so a run reaches 100,000
cases per parser at the cost of a few thousand hypothesis examples.

Every case is classified into the table printed at the end of the module that ran it:
cases run, rejected cleanly (a project error, or dropped and counted), accepted, junk accepted
(a value that breaks the target's own invariants), foreign exceptions (anything that is not a
project error: a traceback waiting to happen) and session drops.
"""

from __future__ import annotations

import contextlib
import json
import random
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

DEEP = 10_000

# -- strategies ------------------------------------------------------------------------------

huge_ints = st.one_of(st.integers(min_value=2**63, max_value=10**60),
                      st.integers(min_value=40, max_value=5000).map(lambda n: "9" * n))
non_finite = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "2e308"])
long_strings = st.integers(min_value=1000, max_value=100_000).map(lambda n: "x" * n)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=20))
wrong_types = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    depth = draw(st.sampled_from([64, 1000, DEEP]))
    opener = draw(st.sampled_from(["[", '{"a":', "[{\"a\":"]))
    closed = draw(st.booleans())
    closer = {"[": "]", '{"a":': "}", "[{\"a\":": "}]"}[opener]
    return opener * depth + "1" + (closer * depth if closed else "")


def _token(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@st.composite
def poisoned_object(draw: st.DrawFn, keys: tuple[str, ...]) -> str:
    """A JSON object with plausible keys whose one value is hostile, written as raw text."""
    bad = draw(st.one_of(huge_ints.map(str), non_finite, long_strings.map(json.dumps),
                         wrong_types.map(json.dumps), deep_nesting()))
    key = draw(st.sampled_from(keys))
    others = {k: draw(scalars) for k in keys if k != key}
    body = ",".join(f"{json.dumps(k)}:{_token(json.dumps(v))}" for k, v in others.items())
    return "{" + body + ("," if body else "") + f"{json.dumps(key)}:{bad}" + "}"


def hostile_json(keys: tuple[str, ...] = ("id", "args", "cmd")) -> st.SearchStrategy[str]:
    """JSON text (or nearly) of every hostile kind."""
    return st.one_of(
        huge_ints.map(str), non_finite, long_strings.map(json.dumps), deep_nesting(),
        wrong_types.map(json.dumps), poisoned_object(keys),
        st.text(max_size=200),  # not JSON at all
    )


non_utf8 = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.text(max_size=60).map(lambda t: t.encode() + b"\xff\xfe\xc3"),
    st.just("{\"a\": \"Stra\xdfe\"}".encode("latin-1")),
)


def hostile_bytes(keys: tuple[str, ...] = ("id", "args", "cmd")) -> st.SearchStrategy[bytes]:
    """Hostile JSON as bytes, bytes that are not UTF-8, and truncations of both."""
    whole = st.one_of(hostile_json(keys).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      non_utf8)
    return st.one_of(whole, st.tuples(whole, st.floats(0, 1)).map(
        lambda p: p[0][: int(len(p[0]) * p[1])]))


def mutations(data: bytes, rng: random.Random, n: int) -> Iterator[bytes]:
    """``n`` cases derived from ``data``: truncations first, then flips and splices."""
    yield data
    cuts = sorted({rng.randrange(len(data) + 1) for _ in range(min(n // 3, len(data) + 1))})
    for cut in cuts:
        yield data[:cut]
    made = 1 + len(cuts)
    while made < n:
        b = bytearray(data or b"\x00")
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            op = rng.randrange(3)
            if op == 0:
                b[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                b[i:i] = bytes((rng.choice((0x80, 0xC3, 0xFF, 0x00, 0x0A)),))
            else:
                del b[i]
                if not b:
                    b.append(0)
        yield bytes(b)
        made += 1


def drawn(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples of ``strategy`` drawn by hypothesis (for targets that run in an event
    loop, where ``@given`` cannot drive the test itself)."""
    out: list[Any] = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(strategy)
    def collect(x: Any) -> None:
        out.append(x)

    collect()
    return out


# -- the summary table ------------------------------------------------------------------------


@dataclass
class Tally:
    target: str
    cases: int = 0
    rejected: int = 0
    accepted: int = 0
    junk: int = 0
    foreign: int = 0
    drops: int = 0
    samples: list[str] = field(default_factory=list)

    def keep(self, what: str) -> None:
        if len(self.samples) < 3:
            self.samples.append(what[:2000])

    def run(self, fn: Callable[[], Any], project_errors: tuple[type[BaseException], ...],
            check: Callable[[Any], bool] = lambda _r: True,
            rejected: Callable[[Any], bool] = lambda _r: False) -> None:
        """One case: ``fn()`` returns (accepted unless ``rejected(result)``; junk when ``check``
        fails) or raises (a project error is a clean rejection; anything else is foreign)."""
        self.cases += 1
        try:
            result = fn()
        except project_errors:
            self.rejected += 1
            return
        except Exception:
            self.foreign += 1
            self.keep(traceback.format_exc())
            return
        if rejected(result):
            self.rejected += 1
        elif check(result):
            self.accepted += 1
        else:
            self.junk += 1
            self.keep(f"junk accepted: {result!r}")

    def assert_clean(self) -> None:
        assert self.foreign == 0, "\n".join(self.samples)
        assert self.junk == 0, "\n".join(self.samples)
        assert self.drops == 0, f"{self.drops} session drops"
        assert self.cases > 0


TABLE: dict[str, Tally] = {}


def tally(target: str) -> Tally:
    """The row of ``target`` (one per target per run, summed over tests)."""
    return TABLE.setdefault(target, Tally(target))


@contextlib.contextmanager
def printed(request: pytest.FixtureRequest, title: str) -> Iterator[None]:
    """Print the rows added inside the block when it ends."""
    before = set(TABLE)
    yield
    rows = [t for name, t in TABLE.items() if name not in before]
    if not rows:
        return
    lines = [f"{'target':40s} {'cases':>8s} {'rejected':>9s} {'accepted':>9s} {'junk':>5s} "
             f"{'foreign':>8s} {'drops':>6s}"]
    lines += [f"{t.target:40s} {t.cases:8d} {t.rejected:9d} {t.accepted:9d} {t.junk:5d} "
              f"{t.foreign:8d} {t.drops:6d}" for t in rows]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n\n{title}\n" + "\n".join(lines), flush=True)
