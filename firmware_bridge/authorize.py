"""Whether a firmware image may go to the microcontroller: signature, board id, anti-rollback.

A signed image travels with a signature file beside it (``IMAGE.sig``, written by
`firmware pack --sign`): ``{"body": MANIFEST, "signature": {"key", "alg", "sig"}}``, where the
manifest names the exact image (``agent.fleet.signing``, domain ``firmware``)::

    {"kind": "firmware-image", "sha256": HEX, "size": N, "version": "X.Y.Z", "board": ID}

``approve`` runs before the first byte of the image is sent and refuses, each with a stable
``reason`` (and counted in ``REFUSALS``):

- ``unsigned``: no signature, unless a technician at the CLI passed ``--allow-unsigned``
  (logged as a warning; the board cannot be checked then, the version still is);
- ``malformed_signature``, ``unknown_key``, ``bad_signature``: as ``TrustedKeys.verify``;
- ``mismatch``: the manifest names another image (sha256, size or version);
- ``wrong_board``: the manifest is for another board than the gateway's (``--board``), or the
  gateway's board is not known;
- ``downgrade``: the image is older than what the device runs, or than the floor this gateway
  recorded for that device (the highest version it ever flashed there; ``FirmwareState``,
  which also counts the refusals by reason across runs of the CLI).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.fleet.signing import SignatureRefused, SigningKey, TrustedKeys, public_key
from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json
from firmware_bridge.errors import UpdateError
from firmware_bridge.image import check_image, parse_version, version_str
from firmware_bridge.messages import Version3

log = logging.getLogger(__name__)

SIGNATURE_SUFFIX: Final = ".sig"
MAX_SIGNATURE_BYTES: Final = 8 * 1024
MAX_FLOOR_BYTES: Final = 64 * 1024
MAX_FLOOR_DEVICES: Final = 256
BOARD_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
VERSION_PATTERN: Final = r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$"  # compared as text

Reason = Literal["unsigned", "malformed_signature", "unknown_key", "bad_signature", "mismatch",
                 "wrong_board", "downgrade"]
REFUSALS: collections.Counter[str] = collections.Counter()
"""Refusals in this process, by reason."""


class FirmwareRefused(UpdateError):
    """The image must not be flashed; ``reason`` is a stable code."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: Reason = reason


class FirmwareManifest(BaseModel):
    """What a firmware signature covers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["firmware-image"] = "firmware-image"
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """Of the whole image, header included."""
    size: Annotated[int, Field(ge=1, le=1 << 32)]
    version: Annotated[str, Field(pattern=VERSION_PATTERN, max_length=11)]
    board: Annotated[str, Field(pattern=BOARD_PATTERN, max_length=64)]


def manifest_for(image: bytes, board: str) -> FirmwareManifest:
    header = check_image(image)
    return FirmwareManifest(sha256=hashlib.sha256(image).hexdigest(), size=len(image),
                            version=version_str(header.version), board=board)


def sign_image(image: bytes, board: str, key: SigningKey) -> bytes:
    """The signature file's bytes for ``image``."""
    body = manifest_for(image, board).model_dump()
    return json.dumps({"body": body, "signature": key.sign("firmware", body)},
                      indent=1).encode() + b"\n"


def _refuse(reason: Reason, message: str) -> FirmwareRefused:
    REFUSALS[reason] += 1
    log.error("firmware image refused (%s): %s", reason, message)
    return FirmwareRefused(reason, message)


def _parse_signed(data: bytes) -> tuple[FirmwareManifest, dict[str, Any], object]:
    try:
        doc = parse_json(data, max_bytes=MAX_SIGNATURE_BYTES)
    except JsonRefused as exc:
        raise _refuse("malformed_signature", f"the signature file is not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"body", "signature"}:
        raise _refuse("malformed_signature",
                      'a signature file is {"body": MANIFEST, "signature": {...}}')
    body = doc["body"]
    try:
        manifest = FirmwareManifest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise _refuse("malformed_signature", f"body.{loc}: {first['msg']}") from None
    assert isinstance(body, dict)
    return manifest, body, doc["signature"]


@dataclass(frozen=True)
class FlashPolicy:
    trusted: TrustedKeys
    board: str | None = None
    """The gateway's board id; a signed image must name it."""
    allow_unsigned: bool = False
    """Only ever from a technician at the CLI; never from the cloud."""
    floor: Version3 | None = None


@dataclass(frozen=True)
class Approval:
    version: Version3
    signed_by: str | None  # None: unsigned, allowed by the technician
    board: str | None


def approve(image: bytes, signature: bytes | None, policy: FlashPolicy,
            installed: Version3) -> Approval:
    """Raise ``FirmwareRefused`` unless ``image`` may replace ``installed``."""
    header = check_image(image)
    shown = version_str(header.version)
    key_id: str | None = None
    board: str | None = None
    if signature is None:
        if not policy.allow_unsigned:
            raise _refuse("unsigned", f"image {shown} has no signature ({SIGNATURE_SUFFIX} "
                                      "file); only a technician may flash it, with "
                                      "--allow-unsigned")
        log.warning("flashing UNSIGNED firmware %s (sha256 %s): allowed by --allow-unsigned",
                    shown, hashlib.sha256(image).hexdigest())
    else:
        manifest, body, sig = _parse_signed(signature)
        try:
            key_id = policy.trusted.verify("firmware", body, sig)
        except SignatureRefused as exc:
            raise _refuse(exc.reason, str(exc)) from None
        except ValueError as exc:  # a trusted key in the config that is not a key
            raise _refuse("unknown_key", f"the trusted keys cannot be read: {exc}") from None
        if (manifest.sha256 != hashlib.sha256(image).hexdigest() or manifest.size != len(image)
                or manifest.version != shown):
            raise _refuse("mismatch", f"the signature is for image {manifest.version} "
                                      f"({manifest.size} bytes, sha256 {manifest.sha256[:16]}"
                                      f"...), not this one ({shown}, {len(image)} bytes)")
        if policy.board is None:
            raise _refuse("wrong_board", f"image {shown} is for board {manifest.board!r}; "
                                         "this gateway's board is not known (--board)")
        if manifest.board != policy.board:
            raise _refuse("wrong_board", f"image {shown} is for board {manifest.board!r}, "
                                         f"this device is a {policy.board!r}")
        board = manifest.board
    if header.version < installed:
        raise _refuse("downgrade", f"image {shown} is older than the {version_str(installed)} "
                                   "the device runs")
    if policy.floor is not None and header.version < policy.floor:
        raise _refuse("downgrade", f"image {shown} is older than {version_str(policy.floor)}, "
                                   "which this gateway already installed on the device")
    return Approval(header.version, key_id, board)


class _StateDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    floors: dict[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")],
                 Annotated[str, Field(pattern=VERSION_PATTERN)]] = Field(
        default_factory=dict, max_length=MAX_FLOOR_DEVICES)
    refused: dict[Reason, Annotated[int, Field(ge=0, le=10**12)]] = Field(default_factory=dict)


class FirmwareState:
    """What a gateway remembers of firmware updates, in a small JSON file: the highest version
    it flashed on each device (by UID; the anti-rollback floor) and its refusals by reason."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> _StateDoc:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return _StateDoc()
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise UpdateError(f"{self.path}: not a regular file")
            raw = fh.read(MAX_FLOOR_BYTES + 1)
        try:
            return _StateDoc.model_validate(parse_json(raw, max_bytes=MAX_FLOOR_BYTES))
        except (JsonRefused, ValidationError) as exc:
            raise UpdateError(f"{self.path}: not a firmware state file: "
                              f"{str(exc).splitlines()[0][:200]}") from None

    def _save(self, doc: _StateDoc) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(doc.model_dump_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def floor(self, uid: bytes) -> Version3 | None:
        text = self._load().floors.get(uid.hex())
        return parse_version(text) if text is not None else None

    def raise_floor(self, uid: bytes, version: Version3) -> None:
        doc = self._load()
        old = doc.floors.get(uid.hex())
        if old is not None and parse_version(old) >= version:
            return
        doc.floors[uid.hex()] = version_str(version)
        if len(doc.floors) > MAX_FLOOR_DEVICES:
            raise UpdateError(f"{self.path}: more than {MAX_FLOOR_DEVICES} devices")
        self._save(doc)

    def count_refusal(self, reason: Reason) -> None:
        doc = self._load()
        doc.refused[reason] = doc.refused.get(reason, 0) + 1
        self._save(doc)

    def refusals(self) -> dict[str, int]:
        return {str(k): v for k, v in self._load().refused.items()}


def read_trusted_keys(text: str) -> dict[str, str]:
    """``KEY_ID PUBLIC_KEY`` per line (``#`` starts a comment)."""
    keys: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        parts = raw.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"line {n}: expected KEY_ID PUBLIC_KEY")
        try:
            public_key(parts[1])
        except ValueError as exc:
            raise ValueError(f"line {n}: {exc}") from None
        keys[parts[0]] = parts[1]
    return keys
