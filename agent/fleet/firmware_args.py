"""The arguments of ``firmware.flash``, as the command dispatcher checks them.

``firmware.flash`` moves a firmware image and its signature file (``IMAGE.sig``, written by
`firmware pack --sign`) with the chunked, resumable transfer of ``model.deploy``
(``agent.fleet.chunks``), told apart by ``op``:

- ``begin``: which bridge sensor's microcontroller, the image's version, size and sha256, and
  the size and sha256 of its signature file. Answered with the chunk indices still missing.
- ``chunk`` and ``status``: as for ``model.deploy`` (the image bytes, then the signature file's).
- ``commit``: check the whole (signature, board id, anti-rollback floor) and only then flash it
  through the running sensor's connection; answered once the device runs the new image.

An image without a signature file is refused at ``begin`` (reason ``unsigned``): from the
cloud there is no ``--allow-unsigned``. Only pydantic here: the dispatcher's allow-list imports
this module.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from agent.fleet.model_args import (
    MAX_CHUNK,
    MIN_CHUNK,
    NAME_PATTERN,
    DeployChunk,
    DeployId,
    DeployStatus,
    Sha256,
)

MAX_IMAGE_BYTES: Final = 16 * 1024 * 1024  # as `firmware flash`: far more than a bridge slot
MAX_SIGNATURE_FILE: Final = 8 * 1024


class _Strict(BaseModel):
    """Unknown fields refused; sizes are strict integers (``true`` is not 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FlashBegin(_Strict):
    op: Literal["begin"]
    deploy_id: DeployId
    sensor: Annotated[str, Field(pattern=NAME_PATTERN, description=(
        "The configured bridge sensor whose microcontroller gets the image."))]
    version: Annotated[str, Field(pattern=r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$",
                                  description="The image's version, X.Y.Z.")]
    sha256: Sha256
    size: Annotated[int, Field(strict=True, ge=1, le=MAX_IMAGE_BYTES)]
    signature_sha256: Sha256 | None = Field(default=None, description=(
        "Of the signature file; null for an unsigned image, which is refused."))
    signature_size: Annotated[int, Field(strict=True, ge=1, le=MAX_SIGNATURE_FILE)] | None = None
    chunk_size: Annotated[int, Field(strict=True, ge=MIN_CHUNK, le=MAX_CHUNK)] = MAX_CHUNK
    gateway: Annotated[str, Field(min_length=1, max_length=128, description=(
        'The gateway this flash is meant for, or "*" for any.'))] = "*"


class FlashCommit(_Strict):
    op: Literal["commit"]
    deploy_id: DeployId


FirmwareFlashArgs = RootModel[Annotated[FlashBegin | DeployChunk | DeployStatus | FlashCommit,
                                        Field(discriminator="op")]]
