"""The ``hello`` driver: a counter, to show what a plugin provides to the agent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from agent.clock import Clock
from agent.readings import Reading
from drivers.base import BuildContext, PolledSensor

DESCRIPTION = "Example plugin: a counter that goes up by a configurable step"
KIND = "virtual"


class Options(BaseModel):
    """``[sensors.options]`` of a ``hello`` sensor, validated when the config is loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 1.0
    start: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    quantity: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = "count"
    unit: str = "count"


class HelloSensor(PolledSensor):
    def __init__(self, name: str, clock: Clock, period_s: float, options: Options) -> None:
        super().__init__(name, clock, period_s)
        self.options = options
        self.value = options.start

    async def sample(self) -> Sequence[Reading]:
        self.value += self.options.step
        return [self.reading(self.options.quantity, self.value, self.options.unit)]


def build(cfg: Any, ctx: BuildContext) -> HelloSensor:
    return HelloSensor(cfg.name, ctx.clock, cfg.period_s, Options.model_validate(cfg.options))
