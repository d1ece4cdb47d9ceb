"""The configuration reference, generated from the pydantic models so it cannot drift."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from agent.config.cleaning import CleanOptions
from agent.config.schema import AgentConfig

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(a).replace("'", '"') for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "unset"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel) or value in ({}, []):
        return ""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _section(title: str, model: type[BaseModel]) -> list[str]:
    lines = [f"### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
    return [*lines, ""]


def reference_markdown() -> str:
    out: list[str] = []
    for name, field in AgentConfig.model_fields.items():
        tp = field.annotation
        origin = typing.get_origin(tp)
        inner = typing.get_args(tp)[0] if origin is list else tp
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            title = f"[[{name}]]" if origin is list else f"[{name}]"
            out += _section(title, inner)
            if name == "streams":
                from agent.config.schema import AudienceConfig, FuseGroup
                out += _section("[[streams.fuse]]", FuseGroup)
                out += _section("[[streams.audiences]]", AudienceConfig)
    out += _section("[sensors.clean.<quantity>]", CleanOptions)
    return "\n".join(out)
