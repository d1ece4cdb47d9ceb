"""Every setting of the schema has a physical bound: numbers both ways, strings, lists and
tables a maximum length. Walks the pydantic models, so a field added without one fails here."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agent.config.schema import AgentConfig

# Values of these keys are free-form by design; the file size and nesting bounds of
# agent.config.load hold them, and the driver validates what it reads.
FREE_FORM = {"SensorConfig.options[value]"}


def _metadata(tp: Any) -> tuple[Any, list[Any]]:
    """The bare type and the constraints of an ``Annotated`` (nested ones merged)."""
    meta: list[Any] = []
    while get_origin(tp) is Annotated:
        args = get_args(tp)
        tp = args[0]
        for m in args[1:]:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return tp, meta


def _has(meta: list[Any], *kinds: type) -> bool:
    return any(isinstance(m, kinds) for m in meta)


def _problems(where: str, tp: Any, meta: list[Any],
              seen: set[type[BaseModel]]) -> Iterator[str]:
    tp, more = _metadata(tp)
    meta = meta + more
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is not type(None):
                # Constraints on the field apply to each member of an Optional.
                yield from _problems(where, arg, meta if len(get_args(tp)) == 2 else [], seen)
        return
    if tp is Any:
        if where not in FREE_FORM:
            yield f"{where}: Any is unbounded"
        return
    if origin is Literal or tp is bool or tp is type(None):
        return
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield from walk(tp, seen)
        return
    if tp in (int, float):
        if not _has(meta, at.Ge, at.Gt) or not _has(meta, at.Le, at.Lt):
            yield f"{where}: {tp.__name__} without both a lower and an upper bound"
        if tp is float and not any(getattr(m, "allow_inf_nan", True) is False for m in meta):
            yield f"{where}: float that accepts NaN and infinity"
        return
    if tp is str:
        if not _has(meta, at.MaxLen):
            yield f"{where}: str without max_length"
        return
    if origin in (list, dict):
        if not _has(meta, at.MaxLen):
            yield f"{where}: {origin.__name__} without max_length"
        args = get_args(tp)
        if origin is dict:
            yield from _problems(f"{where}[key]", args[0], [], seen)
            yield from _problems(f"{where}[value]", args[1], [], seen)
        else:
            yield from _problems(f"{where}[item]", args[0], [], seen)
        return
    yield f"{where}: type {tp!r} is not known to this check"


def walk(model: type[BaseModel], seen: set[type[BaseModel]]) -> Iterator[str]:
    if model in seen:
        return
    seen.add(model)
    hints = typing.get_type_hints(model, include_extras=True)
    for name, info in model.model_fields.items():
        yield from _problems(f"{model.__name__}.{name}", hints[name], list(info.metadata), seen)


def test_every_setting_has_a_bound() -> None:
    problems = list(walk(AgentConfig, set()))
    assert problems == []


def test_the_walk_finds_an_unbounded_field() -> None:
    """The check itself can fail: a model with each kind of unbounded field."""

    class Loose(BaseModel):
        n: int = 0
        x: Annotated[float, at.Ge(0)] = 0.0
        s: str = ""
        items: list[int] = []

    found = list(walk(Loose, set()))
    assert [p.split(":")[0] for p in found] == [
        "Loose.n", "Loose.x", "Loose.x", "Loose.s", "Loose.items", "Loose.items[item]"]
