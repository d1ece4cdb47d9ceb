"""Per-channel cleaning options, as they appear under ``[sensors.clean.<quantity>]``."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class CleanOptions(BaseModel):
    """Overrides of the per-quantity defaults. ``None`` keeps the default for the quantity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: float | None = None  # physical range, canonical units
    max: float | None = None
    max_rate: Annotated[float, Field(gt=0)] | None = None  # units per second
    hampel_window: Annotated[int, Field(ge=3, le=101)] | None = None
    hampel_k: Annotated[float, Field(gt=0)] | None = None
    stuck_count: Annotated[int, Field(ge=2)] | None = None
    stale_factor: Annotated[float, Field(gt=1)] | None = None  # k x period without a reading
    enabled: bool = True
