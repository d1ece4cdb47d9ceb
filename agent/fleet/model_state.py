"""Which file each model runs, remembered across reloads and restarts.

The config names a model's file (``path``) and maybe a shadow candidate (``shadow``).
Activations, deploys and rollbacks change that at run time; ``ModelState`` writes what they
changed to ``models/state.json`` beside the outbox (atomically: the old or the new file, never
half of one) and every generation applies it to the configured models.

An entry applies only while the config still names the ``path`` and ``shadow`` it was made
from: a technician who edits the config's model takes precedence over whatever the cloud did
before. The file is read as hostile input: one that does not parse is logged and set aside,
and the configured models run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from agent.config.schema import ModelConfig
from agent.fleet.chunks import write_atomic
from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json

log = logging.getLogger(__name__)

STATE_FILE: Final = "state.json"
MAX_STATE_BYTES: Final = 256 * 1024
MAX_PATH: Final = 4096


@dataclass
class ModelEntry:
    base: tuple[str, str]  # the config's (path, shadow) this entry was made from
    active: str  # "" = the model shipped in the package
    candidate: str = ""
    auto: bool = False  # activate the candidate by itself once it wins on live windows
    previous: list[str] = field(default_factory=list)  # what rollback returns to, newest last


def _entry(data: object) -> ModelEntry:
    if not isinstance(data, dict):
        raise TypeError("an entry is not an object")
    base, previous = data.get("base"), data.get("previous", [])
    if not (isinstance(base, list) and len(base) == 2 and all(isinstance(b, str) for b in base)):
        raise TypeError("base must be [path, shadow]")
    if not (isinstance(previous, list) and all(isinstance(p, str) for p in previous)):
        raise TypeError("previous must be a list of paths")
    active, candidate, auto = data.get("active"), data.get("candidate", ""), data.get("auto")
    if not isinstance(active, str) or not isinstance(candidate, str):
        raise TypeError("active and candidate must be paths")
    if not isinstance(auto, bool):
        raise TypeError("auto must be true or false")
    if any(len(p) > MAX_PATH for p in (active, candidate, *base, *previous)):
        raise TypeError("a path is too long")
    return ModelEntry((base[0], base[1]), active, candidate, auto, previous[-64:])


class ModelState:
    """The run-time model choices under ``root`` (``<outbox dir>/models``)."""

    def __init__(self, root: Path, versions_kept: int = 3) -> None:
        self.root = root
        self.path = root / STATE_FILE
        self.versions_kept = versions_kept
        self.entries: dict[str, ModelEntry] = {}
        self.load_error: str | None = None
        self._load()

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()[:MAX_STATE_BYTES + 1]
        except FileNotFoundError:
            return
        except OSError as exc:
            self._refuse(f"cannot be read ({exc.strerror})", aside=False)
            return
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise JsonRefused(f"larger than {MAX_STATE_BYTES} bytes")
            data = parse_json(raw, max_bytes=MAX_STATE_BYTES)
            models = data.get("models") if isinstance(data, dict) else None
            if not isinstance(models, dict):
                raise TypeError('no "models" object')
            self.entries = {str(k)[:64]: _entry(v) for k, v in models.items()}
        except (JsonRefused, TypeError, ValueError) as exc:
            self._refuse(str(exc)[:200], aside=True)

    def _refuse(self, why: str, *, aside: bool) -> None:
        self.load_error = f"{self.path}: {why}; running the configured models"
        log.error("model state %s", self.load_error)
        self.entries = {}
        if aside:
            # Kept for a look, out of the way of the next save.
            os.replace(self.path, self.path.with_name(STATE_FILE + ".damaged"))

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"models": {k: {**asdict(e), "base": list(e.base)}
                          for k, e in self.entries.items()}}
        write_atomic(self.path, json.dumps(doc, indent=1).encode())

    def current(self, cfg: ModelConfig) -> ModelEntry | None:
        """The entry of ``cfg`` if it still applies to the config's model."""
        e = self.entries.get(cfg.name)
        if e is None or e.base != (cfg.path, cfg.shadow):
            return None
        return e

    def configs(self, models: Sequence[ModelConfig]) -> list[ModelConfig]:
        """The configured models with the files the state chose for them."""
        out = []
        for cfg in models:
            e = self.current(cfg)
            if e is None and cfg.name in self.entries:
                log.info("model %s: the config names another file now; its deploys and "
                         "activations no longer apply", cfg.name)
                del self.entries[cfg.name]
            if e is not None and e.active and not Path(e.active).is_file():
                # Deleted behind the agent's back: the configured model is better than none.
                log.error("model %s: %s is gone; running the configured model", cfg.name,
                          e.active)
                del self.entries[cfg.name]
                e = None
            if e is not None and e.candidate and not Path(e.candidate).is_file():
                log.error("model %s: candidate %s is gone", cfg.name, e.candidate)
                e.candidate, e.auto = "", False
            out.append(cfg if e is None else
                       cfg.model_copy(update={"path": e.active, "shadow": e.candidate}))
        return out

    def _of(self, cfg: ModelConfig) -> ModelEntry:
        e = self.current(cfg)
        if e is None:
            e = ModelEntry((cfg.path, cfg.shadow), cfg.path, cfg.shadow)
            self.entries[cfg.name] = e
        return e

    def set_candidate(self, cfg: ModelConfig, path: str, *, auto: bool) -> None:
        e = self._of(cfg)
        e.candidate, e.auto = path, auto
        self.save()

    def activated(self, cfg: ModelConfig, path: str) -> None:
        """``path`` became the active file of ``cfg``'s model; the one before is remembered."""
        e = self._of(cfg)
        if e.active != path:
            e.previous = [p for p in e.previous if p not in (e.active, path)]
            e.previous.append(e.active)
            e.previous = e.previous[-self.versions_kept:]
        e.active, e.candidate, e.auto = path, "", False
        self.save()

    def rolled_back(self, cfg: ModelConfig) -> tuple[str, str]:
        """Return to the previous active file; returns (from, to). Raises LookupError when
        there is nothing to go back to."""
        e = self._of(cfg)
        if not e.previous:
            raise LookupError(f"model {cfg.name!r} has no previous version to roll back to")
        was, e.active = e.active, e.previous.pop()
        e.candidate, e.auto = "", False
        self.save()
        return was, e.active

    def in_use(self, name: str) -> set[str]:
        """Every file the state may still run for ``name`` (active, candidate, rollbacks)."""
        e = self.entries.get(name)
        return set() if e is None else {e.active, e.candidate, *e.previous} - {""}
