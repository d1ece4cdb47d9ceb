"""The files of a config deployment: atomic writes, the persisted record, what changed, health.

Beside the config file ``agent.toml`` live:

- ``agent.toml.previous``: the config that ran before the last ``config.apply`` (what a rollback
  restores); removed by a rollback, so a second rollback never re-installs the config that was
  just left (that one is kept as ``agent.toml.rejected`` for inspection);
- ``agent.toml.candidate``: a config being checked (only while ``config.apply`` runs);
- ``agent.toml.deploy.json``: the deployment record (``DeployRecord``), written atomically at
  every state change, so an agent restarted mid-trial knows that the file it runs is on trial.

They sit beside the config file rather than beside the outbox because the config they describe
may move the outbox; the directory must be writable for ``config.apply`` anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json

log = logging.getLogger(__name__)

MAX_RECORD_BYTES: Final = 64 * 1024
MAX_CHANGED_KEYS: Final = 50  # listed in the result; the count is always exact
HEALTHY_FOR_S: Final = 1.0  # the trial's criteria must hold this long, not at one instant
HEARTBEAT_MAX_AGE_S: Final = 2.0  # the process stage wakes every 0.25 s

State = Literal["trial", "confirmed", "rolled_back", "abandoned"]


class Changes(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sections: list[str] = Field(default_factory=list, max_length=64)
    """Top-level sections with at least one change."""
    keys: list[str] = Field(default_factory=list, max_length=MAX_CHANGED_KEYS)
    """Changed key paths (``sensors[1].port``), the first ``MAX_CHANGED_KEYS``."""
    count: Annotated[int, Field(ge=0, le=10**9)] = 0


class DeployRecord(BaseModel):
    """What the agent remembers of the last ``config.apply`` or ``config.rollback``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: Annotated[str, Field(min_length=1, max_length=128)]
    state: State
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """Of the applied config file."""
    previous_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """Of the config it replaced (the one a rollback restores)."""
    changes: Changes = Changes()
    timeout_s: Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]
    """The health timeout the trial runs under (the applying config's)."""
    reason: Annotated[str, Field(max_length=4000)] = ""
    """Why it was rolled back or abandoned."""
    started_ts: Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]
    ended_ts: Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)] | None = None
    reported: bool = False
    """Whether the final outcome was acknowledged by the broker on ``cmd/config.apply/result``."""


def sibling(config: Path, suffix: str) -> Path:
    return config.with_name(config.name + suffix)


def sha256_file(path: Path, limit: int) -> str | None:
    """The digest of a regular file of at most ``limit`` bytes; None if there is none."""
    try:
        data = read_regular(path, limit)
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()


def read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes (OSError for anything else, or a larger file): a FIFO must not
    hang the agent nor a device fill its memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, f"{path}: not a regular file")
        if st.st_size > limit:
            raise OSError(0, f"{path}: {st.st_size} bytes, more than {limit}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise OSError(0, f"{path}: more than {limit} bytes")
        return data
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o640


def load_record(path: Path) -> DeployRecord | None:
    """The record at ``path``; None when there is none or it cannot be read (logged, and the
    file left for inspection: it was written by this agent, so damage means a disk fault)."""
    try:
        raw = read_regular(path, MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("config deployment record %s cannot be read: %s", path, exc)
        return None
    try:
        return DeployRecord.model_validate(parse_json(raw, max_bytes=MAX_RECORD_BYTES))
    except (JsonRefused, ValidationError) as exc:
        log.error("config deployment record %s is damaged, ignored: %s", path,
                  str(exc).splitlines()[0][:300])
        return None


def save_record(path: Path, record: DeployRecord) -> None:
    write_atomic(path, record.model_dump_json().encode(), 0o640)


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> Changes:
    """Which key paths differ between two config documents (as ``model_dump(mode="json")``)."""
    keys: list[str] = []
    count = 0
    sections: set[str] = set()
    stack: list[tuple[str, Any, Any]] = [(k, old.get(k), new.get(k))
                                         for k in sorted(set(old) | set(new), reverse=True)]
    while stack:
        path, a, b = stack.pop()
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            stack += [(f"{path}.{k}", a.get(k), b.get(k))
                      for k in sorted(set(a) | set(b), reverse=True)]
            continue
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            stack += [(f"{path}[{i}]", x, y) for i, (x, y) in reversed(list(enumerate(zip(a, b,
                                                                                       strict=True))))]
            continue
        count += 1
        sections.add(path.split(".")[0].split("[")[0])
        if len(keys) < MAX_CHANGED_KEYS:
            keys.append(path)
    return Changes(sections=sorted(sections)[:64], keys=keys, count=count)


def trial_problems(snapshot: Mapping[str, Any]) -> list[str]:
    """Why a generation is not healthy, from its status snapshot; empty when it is.

    Healthy means: every enabled sensor is ``up`` (it delivered a reading since its last
    failure), the uplink is ``connected`` to the broker, and the process stage made progress
    in the last ``HEARTBEAT_MAX_AGE_S`` seconds with no stage failure counted.
    """
    out: list[str] = []
    for s in snapshot.get("sensors") or []:
        if s.get("state") != "up":
            err = f" ({str(s.get('last_error'))[:200]})" if s.get("last_error") else ""
            out.append(f"sensor {s.get('name')}: {s.get('state')}{err}")
    uplink = snapshot.get("uplink") or {}
    if uplink.get("state") != "connected":
        out.append(f"uplink: {uplink.get('state', 'not running')}")
    pipeline = snapshot.get("pipeline")
    if not isinstance(pipeline, dict):
        out.append("pipeline: not running")
    else:
        age = pipeline.get("heartbeat_age_s")
        if not isinstance(age, (int, float)) or age > HEARTBEAT_MAX_AGE_S:
            out.append(f"pipeline: no progress for {age} s")
        errors = pipeline.get("errors") or {}
        if errors:
            out.append("pipeline: stage failures " + ", ".join(
                f"{k} {v}" for k, v in sorted(errors.items())))
    return out
