"""Config of fleet operations: which keys may sign what the cloud sends, and the other brokers
a gateway may fail over to."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from agent.config.base import _Frozen

KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BASE64_KEY_PATTERN = r"^[A-Za-z0-9+/]{43}=$"  # 32 raw bytes in standard base64


class TrustedKeyConfig(_Frozen):
    id: Annotated[str, Field(pattern=KEY_ID_PATTERN, max_length=64)]
    """The key id a signature names (`{"key": ID, ...}`)."""
    public_key: Annotated[str, Field(pattern=BASE64_KEY_PATTERN, max_length=44)]
    """The ed25519 public key: 32 bytes in standard base64 (`edge-agent fleet keygen`)."""


class CommandsConfig(_Frozen):
    require_signature: bool = True
    """State-changing cloud commands (model, config and firmware changes) run only when signed
    by one of `trusted_keys`. Read-only commands (`ping`, `config.get`, ...) need no signature."""
    trusted_keys: list[TrustedKeyConfig] = Field(default_factory=list, max_length=16)
    """Public keys whose signatures this gateway accepts; list the new one beside the old one
    while rotating (`[[commands.trusted_keys]]`)."""

    apply_health_timeout_s: Annotated[float, Field(ge=2, le=3600, allow_inf_nan=False)] = 120.0
    """How long a config sent by `config.apply` has to become healthy (every enabled sensor up,
    the uplink connected, the pipeline making progress, all for one second) before the agent
    goes back to the previous config by itself."""

    @field_validator("trusted_keys")
    @classmethod
    def _unique_ids(cls, keys: list[TrustedKeyConfig]) -> list[TrustedKeyConfig]:
        seen: set[str] = set()
        for k in keys:
            if k.id in seen:
                raise ValueError(f"key id {k.id!r} is listed twice")
            seen.add(k.id)
        return keys

    def trusted(self) -> dict[str, str]:
        return {k.id: k.public_key for k in self.trusted_keys}


class ModelDeployConfig(_Frozen):
    max_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 16 * 1024 * 1024
    """Largest model deploy accepted over MQTT: the ONNX file and its manifest together."""
    partial_expire_s: Annotated[float, Field(ge=60, le=30 * 86_400, allow_inf_nan=False)] = (
        86_400.0)
    """A deploy whose chunks stopped arriving this long ago is deleted (its chunks are on disk
    beside the outbox until then, so a restart or a broker outage resumes it)."""
    versions_kept: Annotated[int, Field(ge=1, le=16)] = 3
    """Installed versions of a model kept on disk for `model.rollback`, besides the active one
    and the candidate."""


class BrokerAddress(_Frozen):
    host: Annotated[str, Field(min_length=1, max_length=253)]
    """Broker host name or address."""
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    """Broker port."""
