"""What a control-socket client may ask: the command names and their arguments, validated.

One JSON object per line: ``{"id": ..., "cmd": "...", "args": {...}}``. Unknown commands,
unknown argument keys and over-long strings are refused before anything runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Command = Literal["status", "reload", "tail", "outbox.stats", "outbox.export", "sensors.list",
                  "model.activate"]


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


class ModelActivateArgs(Args):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    """The model whose shadow candidate becomes active."""
    force: bool = False
    """Activate even if the candidate has not beaten the active model and persistence."""


ARGS: dict[str, type[Args]] = {
    "status": NoArgs, "reload": NoArgs, "outbox.stats": NoArgs, "outbox.export": NoArgs,
    "tail": TailArgs, "sensors.list": SensorsArgs, "model.activate": ModelActivateArgs,
}
