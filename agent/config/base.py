"""What every section of the config schema shares: the frozen base model and bounded types."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Every number has a physical bound and every string and list a length bound
# (tests/test_config_bounds.py walks the models and fails on one without): a hostile or
# mistyped file must be refused here, not found out by the running agent.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
PositiveSeconds = Annotated[float, Field(ge=0.001, le=86_400, allow_inf_nan=False)]
"""1 ms to a day."""
Text = Annotated[str, Field(max_length=256)]
"""Free text, e.g. a site description."""
FilePath = Annotated[str, Field(max_length=4096)]
"""A file name (Linux PATH_MAX)."""
Channel = Annotated[str, Field(max_length=130)]
"""`sensor.quantity`."""
Key = Annotated[str, Field(max_length=64)]
"""A table key chosen by the user (quantity, option name, field pattern)."""
MAX_SENSORS = 256
MAX_ITEMS = 64  # streams, models, fuse groups, patterns, options per table


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
