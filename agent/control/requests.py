"""What a control-socket client may ask: the command names and their arguments, validated.

One JSON object per line: ``{"id": ..., "cmd": "...", "args": {...}}``. Unknown commands,
unknown argument keys and over-long strings are refused before anything runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Command = Literal["status", "reload", "tail", "outbox.stats", "outbox.export", "sensors.list"]


RequestId = int | Annotated[str, Field(max_length=64)] | None


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: RequestId = None
    cmd: Command
    args: dict[str, Any] = Field(default_factory=dict)


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(Args):
    pass


class TailArgs(Args):
    match: Annotated[str, Field(max_length=128)] = ""
    """Sensor, stream or model name; empty for everything."""


class SensorsArgs(Args):
    name: Annotated[str, Field(max_length=128)] | None = None


ARGS: dict[str, type[Args]] = {
    "status": NoArgs, "reload": NoArgs, "outbox.stats": NoArgs, "outbox.export": NoArgs,
    "tail": TailArgs, "sensors.list": SensorsArgs,
}
