"""Partial model deploys on disk: chunks persisted as they arrive, so a deploy resumes.

A deploy is an ONNX file followed by its manifest, sent as one byte stream cut into chunks of
``chunk_size``. Its header (``DeployHeader``: names, sizes and sha256s, the signature) is written
when it begins; each chunk is checked against its own sha256 and written atomically under
``deploys/<deploy_id>/`` beside the outbox. What is missing is what has no file, so a restart
of the agent or of the broker loses at most the chunks in flight. ``firmware.flash`` moves an
image and its signature file the same way (``agent.fleet.firmware_deploy``).

Disk stays bounded: a deploy is at most ``max_bytes``, at most ``MAX_PARTIAL`` deploys are in
progress (the least recently touched is dropped to make room), and one untouched for
``expire_s`` is deleted. Whatever is on disk is read as hostile: a header that does not parse
drops its deploy, never the agent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json

log = logging.getLogger(__name__)

MAX_PARTIAL: Final = 2
HEADER: Final = "header.json"
MAX_HEADER_BYTES: Final = 8192
MISSING_LISTED: Final = 2000  # indices in one reply (a reply is at most 128 KiB)


class DeployError(ValueError):
    """A deploy request the gateway refuses; the message says what and why."""


@dataclass(frozen=True)
class DeployHeader:
    """What a deploy declares before its first chunk; the signed part is ``body()``."""

    deploy_id: str
    name: str
    version: str
    sha256: str
    size: int
    manifest_sha256: str
    manifest_size: int
    chunk_size: int
    gateway: str
    sig: dict[str, Any] | None = None

    @property
    def total(self) -> int:
        return self.size + self.manifest_size

    @property
    def count(self) -> int:
        return -(-self.total // self.chunk_size)

    def body(self) -> dict[str, Any]:
        """The document the artifact signature covers (domain ``model``)."""
        return artifact_body(name=self.name, version=self.version, sha256=self.sha256,
                             size=self.size, manifest_sha256=self.manifest_sha256,
                             manifest_size=self.manifest_size, gateway=self.gateway)

    def same_artifact(self, other: DeployHeader) -> bool:
        return self.body() == other.body() and self.chunk_size == other.chunk_size


def artifact_body(*, name: str, version: str, sha256: str, size: int, manifest_sha256: str,
                  manifest_size: int, gateway: str) -> dict[str, Any]:
    return {"name": name, "version": version, "sha256": sha256, "size": size,
            "manifest_sha256": manifest_sha256, "manifest_size": manifest_size,
            "gateway": gateway}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new bytes after a crash."""
    # Unique per writer: two threads storing the same chunk must not share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkStore:
    """The partial deploys under ``root`` (``<outbox dir>/deploys``)."""

    def __init__(self, root: Path, max_bytes: int, expire_s: float,
                 clock: Callable[[], float] = time.time, kind: str = "model deploy") -> None:
        self.root = root
        self.kind = kind  # what the logs call a deploy here
        self.max_bytes = max_bytes
        self.expire_s = expire_s
        self._clock = clock
        self.expired = 0
        self.evicted = 0

    def _dir(self, deploy_id: str) -> Path:
        return self.root / deploy_id

    def header(self, deploy_id: str) -> DeployHeader | None:
        """The stored header, or None (none stored, or one that does not parse: dropped)."""
        path = self._dir(deploy_id) / HEADER
        try:
            raw = path.read_bytes()[:MAX_HEADER_BYTES + 1]
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("%s %s: cannot read its header (%s); dropped", self.kind, deploy_id,
                      exc.strerror)
            self.drop(deploy_id)
            return None
        try:
            if len(raw) > MAX_HEADER_BYTES:
                raise JsonRefused("too large")
            data = parse_json(raw, max_bytes=MAX_HEADER_BYTES)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            header = DeployHeader(**data)
            self.check(header)
        except (JsonRefused, TypeError, ValueError) as exc:
            log.error("%s %s: its header on disk is damaged (%s); dropped",
                      self.kind, deploy_id, str(exc)[:200])
            self.drop(deploy_id)
            return None
        return header

    def check(self, h: DeployHeader) -> None:
        """Refuse a header whose fields cannot describe a deploy this gateway takes."""
        for what in ("deploy_id", "name", "version", "sha256", "manifest_sha256", "gateway"):
            if not isinstance(getattr(h, what), str):
                raise DeployError(f"{what} must be a string")
        if h.sig is not None and not isinstance(h.sig, dict):
            raise DeployError("sig must be an object")
        for what, value in (("size", h.size), ("manifest_size", h.manifest_size),
                            ("chunk_size", h.chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DeployError(f"{what} must be a positive integer")
        if h.total > self.max_bytes:
            raise DeployError(f"the model and manifest are {h.total} bytes; this gateway takes "
                              f"at most {self.max_bytes} ([model_deploy] max_bytes)")

    def begin(self, h: DeployHeader) -> list[int]:
        """Start ``h`` or resume it; returns the missing chunk indices. A different artifact
        under the same id is refused."""
        self.check(h)
        self.sweep()
        old = self.header(h.deploy_id)
        if old is not None:
            if not old.same_artifact(h):
                raise DeployError(f"deploy {h.deploy_id!r} is already in progress with another "
                                  "artifact; use a new deploy_id")
            self._touch(h.deploy_id)
            return self.missing(h.deploy_id, old)
        self._make_room()
        d = self._dir(h.deploy_id)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / HEADER, json.dumps(asdict(h)).encode())
        log.info("%s %s: %s version %s, %d bytes in %d chunks", self.kind, h.deploy_id, h.name,
                 h.version, h.total, h.count)
        return list(range(h.count))

    def put(self, deploy_id: str, index: int, sha256: str, data: bytes) -> DeployHeader:
        """Store one chunk after checking it; a chunk already stored is kept (a repeat)."""
        h = self.header(deploy_id)
        if h is None:
            raise DeployError(f"no deploy {deploy_id!r} is in progress (begin it first, or it "
                              "expired)")
        if not 0 <= index < h.count:
            raise DeployError(f"chunk index {index} is outside 0..{h.count - 1}")
        expected = min(h.chunk_size, h.total - index * h.chunk_size)
        if len(data) != expected:
            raise DeployError(f"chunk {index} has {len(data)} bytes; {expected} expected")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DeployError(f"chunk {index} does not match its sha256")
        path = self._dir(deploy_id) / f"{index:06d}.chunk"
        if not path.exists():
            write_atomic(path, data)
        self._touch(deploy_id)
        return h

    def missing(self, deploy_id: str, h: DeployHeader | None = None) -> list[int]:
        h = h or self.header(deploy_id)
        if h is None:
            raise DeployError(f"no deploy {deploy_id!r} is in progress")
        d = self._dir(deploy_id)
        have = {p.name for p in d.iterdir()} if d.is_dir() else set()
        return [i for i in range(h.count) if f"{i:06d}.chunk" not in have]

    def assemble(self, deploy_id: str) -> tuple[DeployHeader, bytes, bytes]:
        """The header, the ONNX bytes and the manifest bytes, each checked against its sha256."""
        h = self.header(deploy_id)
        if h is None:
            raise DeployError(f"no deploy {deploy_id!r} is in progress")
        missing = self.missing(deploy_id, h)
        if missing:
            raise DeployError(f"deploy {deploy_id!r} lacks {len(missing)} of {h.count} chunks "
                              f"(first missing: {missing[0]})")
        d = self._dir(deploy_id)
        whole = b"".join((d / f"{i:06d}.chunk").read_bytes() for i in range(h.count))
        onnx, manifest = whole[:h.size], whole[h.size:]
        for what, ok in (
                ("the ONNX file", len(whole) == h.total
                 and hashlib.sha256(onnx).hexdigest() == h.sha256),
                ("the manifest", hashlib.sha256(manifest).hexdigest() == h.manifest_sha256)):
            if not ok:
                # Every chunk matched its own sha256 when it came: the sender declared other
                # content, or a chunk changed on disk. Either way, start again from nothing.
                self.drop(deploy_id)
                raise DeployError(f"deploy {deploy_id!r}: {what} does not match its sha256; "
                                  "its chunks were deleted, send it again")
        return h, onnx, manifest

    def drop(self, deploy_id: str) -> None:
        shutil.rmtree(self._dir(deploy_id), ignore_errors=True)

    def _touch(self, deploy_id: str) -> None:
        os.utime(self._dir(deploy_id) / HEADER)

    def _partial(self) -> list[tuple[float, str]]:
        """(last touched, id) of every deploy on disk, oldest first."""
        out = []
        if not self.root.is_dir():
            return []
        for d in self.root.iterdir():
            try:
                out.append(((d / HEADER).stat().st_mtime, d.name))
            except OSError:
                out.append((0.0, d.name))  # no header: a begin that never finished
        return sorted(out)

    def sweep(self) -> list[str]:
        """Delete the deploys untouched for ``expire_s``; returns their ids."""
        gone = []
        now = self._clock()
        for touched, deploy_id in self._partial():
            if now - touched > self.expire_s:
                log.warning("%s %s: no chunk for %.0f s; deleted", self.kind, deploy_id,
                            now - touched)
                self.drop(deploy_id)
                self.expired += 1
                gone.append(deploy_id)
        return gone

    def _make_room(self) -> None:
        partial = self._partial()
        while len(partial) >= MAX_PARTIAL:
            _, deploy_id = partial.pop(0)
            log.warning("%s %s: dropped to make room for a newer deploy", self.kind,
                        deploy_id)
            self.drop(deploy_id)
            self.evicted += 1

    def status(self) -> dict[str, Any]:
        deploys = {}
        for _, deploy_id in self._partial():
            h = self.header(deploy_id)
            if h is not None:
                deploys[deploy_id] = {"name": h.name, "version": h.version, "count": h.count,
                                      "missing": len(self.missing(deploy_id, h))}
        return {"in_progress": deploys, "expired": self.expired, "evicted": self.evicted}
