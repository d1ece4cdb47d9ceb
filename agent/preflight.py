"""Everything `run` would refuse, found before a configuration is accepted.

Validation (``agent.config.load``) checks the file on its own; a config can still pass it and
then fail when the pipeline is put together: a fuse group the windower refuses, a model file
that is not a model, an outbox path naming some other file, a socket path the kernel cannot
bind. ``preflight`` builds every object of a generation the way ``agent.generation.Pipeline``
does, but opens no hardware, writes no file and touches no network, and returns one `Problem`
per failure with its key path. `edge-agent config check`, `edge-agent run` and a reload
(SIGHUP, `edge-agent reload`) all call it, so a config that passes is one that runs.

A model file that is there but not a valid model is a `Preflight.warnings` entry: the running
agent starts without that model, or keeps the version it has loaded (``agent.pipeline.infer``),
so `run` and a reload go ahead and log it; `config check` counts it as a problem. A model path
that is not a regular file is an error everywhere: reading it could hang or fill the memory.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.load import Problem
from agent.config.schema import AgentConfig, ModelConfig
from agent.feed.messages import Topics
from agent.feed.sharing import SharingPolicy
from agent.outbox.recovery import OutboxPathError, check_outbox_path
from agent.pipeline.alarms import AnomalyStage
from agent.pipeline.clean import Cleaner
from agent.pipeline.clocksync import ClockSync
from agent.pipeline.history import HistoryError, open_history
from agent.pipeline.windows import Windower

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL
MAX_MODEL_BYTES = 256 * 1024 * 1024  # the shipped models are a few KiB
MAX_SMALL_FILE_BYTES = 1024 * 1024  # a CA bundle, a key, a credentials file


def _built(where: str, build: Callable[[], object]) -> list[Problem]:
    try:
        build()
    except Exception as exc:  # any failure to build is a reason to refuse the config
        log.debug("preflight: %s cannot be built", where, exc_info=True)
        return [Problem(where, "", f"cannot be built: {type(exc).__name__}: {exc}")]
    return []


def _regular_file(path: Path, limit: int) -> str | None:
    """Why ``path`` cannot be read as a model file, or None."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file"
    if st.st_size > limit:
        return f"{path}: {st.st_size} bytes, more than {limit}"
    return None


@dataclass
class Preflight:
    errors: list[Problem] = field(default_factory=list)
    """What `run` and a reload refuse."""
    warnings: list[Problem] = field(default_factory=list)
    """What they log and go on without (a model that does not load)."""

    @property
    def problems(self) -> list[Problem]:
        """Everything, for `config check`."""
        return self.errors + self.warnings


def _model_problems(i: int, m: ModelConfig, out: Preflight) -> None:
    # numpy and onnxruntime come in only when a model is configured.
    from agent.pipeline.loaded_model import feature_spec, resolve
    from models.manifest import verify

    for key, path in (("path", m.path), ("shadow", m.shadow)):
        if key == "shadow" and not path:
            continue
        where = f"models[{i}].{key}"
        try:
            onnx = resolve(m, path)
        except Exception as exc:  # e.g. no shipped model of that name
            out.warnings.append(Problem(where, repr(path), f"no model file: {exc}"))
            continue
        bad = _regular_file(onnx, MAX_MODEL_BYTES)
        if bad is not None:
            if onnx.exists():
                out.errors.append(Problem(where, repr(path), bad))
            else:
                out.warnings.append(Problem(where, repr(path), bad))
            continue
        try:
            feature_spec(verify(onnx, runtime=m.runtime).manifest)
        except Exception as exc:  # ModelError, FeatureError, or a manifest that is not one
            out.warnings.append(Problem(where, repr(path), str(exc)))


def _mqtt_files(cfg: AgentConfig, out: Preflight) -> None:
    """The files the uplink reads at each connect: a FIFO or a device there would hang it or
    fill the memory (refused). A missing one is not a problem here: it may be provisioned
    after the config, and the uplink names it at every connect until it is there."""
    for key in ("ca_file", "cert_file", "key_file", "credentials_file"):
        name = getattr(cfg.mqtt, key)
        if not name or not Path(name).exists():
            continue
        bad = _regular_file(Path(name), MAX_SMALL_FILE_BYTES)
        if bad is not None:
            out.errors.append(Problem(f"mqtt.{key}", "", bad))


def _nearest_dir(path: Path) -> str | None:
    """Why the directory of ``path`` could not be used or created, or None."""
    parent = path.parent
    while True:
        try:
            st = parent.stat()
        except FileNotFoundError:
            if parent.parent == parent:
                return None
            parent = parent.parent
            continue
        except OSError as exc:
            return f"{parent}: {exc.strerror or exc}"
        return None if stat.S_ISDIR(st.st_mode) else f"{parent} is not a directory"


def _socket_problems(path_text: str) -> list[Problem]:
    path = Path(path_text)
    where = "control.socket"
    if len(os.fsencode(path_text)) > SUN_PATH_MAX:
        return [Problem(where, "", f"longer than the {SUN_PATH_MAX} bytes a Unix socket "
                                   "path may have")]
    try:
        st = path.lstat()
    except FileNotFoundError:
        # The agent creates the socket's own directory, never the ones above it.
        if not path.parent.is_dir() and not path.parent.parent.is_dir():
            return [Problem(where, path_text, f"{path.parent.parent} is not a directory (the "
                                              "agent creates only the socket's own directory)")]
        return []
    except OSError as exc:
        return [Problem(where, path_text, exc.strerror or str(exc))]
    if not stat.S_ISSOCK(st.st_mode):
        return [Problem(where, path_text, "exists and is not a socket")]
    return []


def _outbox_problems(path_text: str) -> list[Problem]:
    try:
        check_outbox_path(Path(path_text))
    except OutboxPathError as exc:
        return [Problem("outbox.path", path_text, str(exc))]
    bad = _nearest_dir(Path(path_text))
    return [] if bad is None else [Problem("outbox.path", path_text, bad)]


def _history_problems(cfg: AgentConfig) -> list[Problem]:
    """A history file that exists must be one (the agent never overwrites another file)."""
    used = any(m.enabled for m in cfg.models) or any(st.anomaly for st in cfg.streams)
    if not cfg.history.enabled or not used:
        return []
    path_text = cfg.history_path()
    where = "history.path" if cfg.history.path else "history.path (beside outbox.path)"
    path = Path(path_text)
    try:
        exists = path.exists()
    except OSError as exc:
        return [Problem(where, path_text, f"cannot be inspected: {exc.strerror or exc}")]
    if exists:
        try:
            open_history(path, create=False).close()
        except HistoryError as exc:
            return [Problem(where, path_text, str(exc).removeprefix(f"{path}: "))]
        return []
    bad = _nearest_dir(path)
    return [] if bad is None else [Problem(where, path_text, bad)]


def preflight(cfg: AgentConfig) -> Preflight:
    """Build what a generation of ``cfg`` would build, without hardware; the problems."""
    clock = ClockSync(lambda _wall_ns: True)
    out = Preflight()
    out.errors += _built("sensors", lambda: Cleaner(cfg.sensors, clock))
    out.errors += _built("streams", lambda: Windower(cfg.streams, cfg.sensors, clock=clock))
    out.errors += _built("streams", lambda: AnomalyStage(cfg))
    out.errors += _built("streams", lambda: SharingPolicy(cfg))
    out.errors += _built("mqtt.topic_prefix",
                         lambda: Topics(cfg.mqtt.topic_prefix, cfg.gateway.id))
    for i, m in enumerate(cfg.models):
        if m.enabled:
            _model_problems(i, m, out)
    _mqtt_files(cfg, out)
    out.errors += _outbox_problems(cfg.outbox.path)
    out.errors += _history_problems(cfg)
    out.errors += _socket_problems(cfg.control.socket)
    return out
