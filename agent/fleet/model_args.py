"""The arguments of ``model.deploy`` and ``model.rollback``, as the command dispatcher checks them.

``model.deploy`` is one command with four steps, told apart by ``op``:

- ``begin``: what is coming (name, version, sizes and sha256 of the ONNX file and of its
  manifest, chunk size, target gateway or ``*``) and its signature (domain ``model``). Answered
  with the chunk indices still missing, so the same ``begin`` resumes an interrupted deploy.
- ``chunk``: one chunk of the ONNX bytes followed by the manifest bytes, base64, with its own
  sha256. Answered with how many are still missing.
- ``status``: the chunk indices still missing.
- ``commit``: check the whole, install it and start it in shadow; ``activate`` says what then:
  ``auto`` (activated by itself once it beats the active model on live windows), ``manual``
  (stays in shadow until ``model.activate``) or ``force`` (activated now).

Only pydantic here: the dispatcher's allow-list imports this module.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
MAX_CHUNK: Final = 8192  # base64 of it, plus the envelope, fits a 16 KiB command
MIN_CHUNK: Final = 256

DeployId = Annotated[str, Field(pattern=ID_PATTERN, description="The deploy's id, chosen by "
                                "the sender; the same id resumes.")]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN, description="sha256, 64 hex digits.")]
Size = Annotated[int, Field(strict=True, ge=1, le=2**40)]  # `true` is not 1, 2.0 is not 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeployBegin(_Strict):
    op: Literal["begin"]
    deploy_id: DeployId
    name: Annotated[str, Field(pattern=NAME_PATTERN, description="The configured model.")]
    version: Annotated[str, Field(pattern=ID_PATTERN, description="The version's folder name.")]
    sha256: Sha256
    size: Size
    manifest_sha256: Sha256
    manifest_size: Size
    chunk_size: Annotated[int, Field(strict=True, ge=MIN_CHUNK, le=MAX_CHUNK)] = MAX_CHUNK
    gateway: Annotated[str, Field(min_length=1, max_length=128, description=(
        'The gateway the artifact is signed for, or "*" for any.'))] = "*"
    sig: dict[str, Any] | None = Field(default=None, description=(
        'The artifact signature: {"key", "alg": "ed25519", "sig"} over the signed body.'))


class DeployChunk(_Strict):
    op: Literal["chunk"]
    deploy_id: DeployId
    index: Annotated[int, Field(strict=True, ge=0, le=2**32)]
    sha256: Sha256
    data: Annotated[str, Field(max_length=4 * MAX_CHUNK // 3 + 4,
                               pattern=r"^[A-Za-z0-9+/]*={0,2}$")]


class DeployStatus(_Strict):
    op: Literal["status"]
    deploy_id: DeployId


class DeployCommit(_Strict):
    op: Literal["commit"]
    deploy_id: DeployId
    activate: Literal["auto", "manual", "force"] = "auto"


ModelDeployArgs = RootModel[Annotated[DeployBegin | DeployChunk | DeployStatus | DeployCommit,
                                      Field(discriminator="op")]]


class ModelRollbackArgs(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        description="The model to return to its previous version.")
