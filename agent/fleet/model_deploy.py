"""``model.deploy`` and ``model.rollback`` on the gateway: chunks in, a verified version out.

A deploy (see ``agent.fleet.model_args``) is checked twice: at ``begin`` its signature (domain
``model``, by a key in ``[commands] trusted_keys``) and target gateway, before a byte is stored;
at ``commit`` the whole against its sha256s, then the manifest exactly as a shipped model's
(``models.manifest.verify``). Only then is it moved into ``models/<name>/<version>/`` beside the
outbox and started in shadow as the candidate, next to the active model.

The candidate becomes active only when it beat the active model and persistence on the live
windows both saw (the skill gate of ``model.activate``), unless the deploy said ``force``.
Every activation, deploy and rollback is written to the model state (``agent.fleet.model_state``)
before it takes effect, so it survives reloads and restarts. Refusals are counted by reason.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from agent.config.schema import AgentConfig, ModelConfig
from agent.fleet.chunks import (
    MISSING_LISTED,
    ChunkStore,
    DeployError,
    DeployHeader,
    fsync_dir,
    write_atomic,
)
from agent.fleet.model_state import ModelState
from agent.fleet.signing import SignatureRefused, TrustedKeys

if TYPE_CHECKING:
    from agent.pipeline.skill import Verdict

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
INSTALL_TMP: Final = ".installing"
SWEEP_S: Final = 600.0  # how often a running agent looks for expired partial deploys


class Stage(Protocol):
    """What deploys need of the inference stage."""

    def reload(self, models: Sequence[ModelConfig]) -> list[str]: ...

    def activate(self, name: str, *, force: bool = False) -> str: ...

    def candidate(self, name: str) -> tuple[Path, Verdict | None] | None: ...


class ModelDeployments:
    """The deploys, activations and rollbacks of one gateway's models."""

    def __init__(self, cfg: AgentConfig, stage: Stage) -> None:
        self.cfg = cfg
        self.stage = stage
        root = Path(cfg.outbox.path).parent
        d = cfg.model_deploy
        self.models_dir = root / "models"
        self.state = ModelState(self.models_dir, d.versions_kept)
        self.chunks = ChunkStore(root / "deploys", d.max_bytes, d.partial_expire_s)
        self.trusted = TrustedKeys(cfg.commands.trusted())
        self.counts: dict[str, int] = {"installed": 0, "activated": 0, "rolled_back": 0,
                                       "failed": 0}
        self.refused: dict[str, int] = {}
        self.last: dict[str, str] = {}  # model -> what happened to it last
        self._changing = asyncio.Lock()  # one commit or rollback at a time
        self._swept = time.monotonic()
        try:
            self.chunks.sweep()  # what expired while the agent was down
        except OSError as exc:
            log.error("model deploys: cannot clean up expired deploys: %s", exc)

    # -- what the stage runs ------------------------------------------------------------------

    def configs(self) -> list[ModelConfig]:
        """The enabled models with the files the state chose for them."""
        return self.state.configs([m for m in self.cfg.models if m.enabled])

    def _base(self, name: str) -> ModelConfig:
        """The configured model ``name`` (the state keys its entry by it)."""
        for m in self.cfg.models:
            if m.name == name and m.enabled:
                return m
        raise DeployError(f"no enabled model named {name!r} is configured here "
                          f"(models: {', '.join(m.name for m in self.cfg.models) or 'none'})")

    # -- commands -----------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        return {"model.deploy": self._deploy, "model.rollback": self._rollback}

    async def _deploy(self, args: dict[str, Any]) -> dict[str, Any]:
        op = args["op"]
        try:
            if op == "begin":
                return await asyncio.to_thread(self.begin, DeployHeader(
                    **{k: v for k, v in args.items() if k != "op"}))
            if op == "chunk":
                return await asyncio.to_thread(self.chunk, args["deploy_id"], args["index"],
                                               args["sha256"], args["data"])
            if op == "status":
                missing = await asyncio.to_thread(self.chunks.missing, args["deploy_id"])
                return {"deploy_id": args["deploy_id"], **_listed(missing)}
            async with self._changing:
                return await self.commit(args["deploy_id"], args["activate"])
        except DeployError:
            self.counts["failed"] += 1
            raise
        except OSError as exc:  # a full or failing disk: say so, keep what is stored
            self.counts["failed"] += 1
            log.error("model deploy %s: %s: %s", args["deploy_id"], op, exc)
            raise DeployError(f"{op}: the gateway cannot write its disk: "
                              f"{exc.strerror or exc}") from None

    async def _rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        async with self._changing:
            return await self.rollback(args["name"])

    # -- the steps ----------------------------------------------------------------------------

    def _refuse(self, reason: str, message: str) -> DeployError:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning("model deploy refused: %s: %s", reason, message)
        return DeployError(f"{reason}: {message}")

    def check_signature(self, h: DeployHeader) -> None:
        """The artifact must be signed by a trusted key (unless signatures are off and it is
        unsigned) and meant for this gateway."""
        if h.gateway not in ("*", self.cfg.gateway.id):
            raise self._refuse("wrong_gateway", f"the artifact is signed for gateway "
                                                f"{h.gateway[:64]!r}, not this one")
        if h.sig is None and not self.cfg.commands.require_signature:
            log.warning("model deploy %s: unsigned, accepted because [commands] "
                        "require_signature is off", h.deploy_id)
            return
        try:
            key = self.trusted.verify("model", h.body(), h.sig)
        except SignatureRefused as exc:
            raise self._refuse(exc.reason, str(exc)) from None
        log.info("model deploy %s: signed by key %s", h.deploy_id, key)

    def _version_dir(self, name: str, version: str) -> Path:
        return self.models_dir / name / version

    def _installed(self, h: DeployHeader) -> str | None:
        """``active`` or ``shadow`` when this very artifact already runs."""
        onnx = self._version_dir(h.name, h.version) / f"{h.name}.onnx"
        e = self.state.current(self._base(h.name))
        if e is None or str(onnx) not in (e.active, e.candidate):
            return None
        try:
            same = hashlib.sha256(onnx.read_bytes()).hexdigest() == h.sha256
        except OSError:
            return None
        return None if not same else "active" if e.active == str(onnx) else "shadow"

    def begin(self, h: DeployHeader) -> dict[str, Any]:
        self.check_signature(h)
        self._base(h.name)
        installed = self._installed(h)
        if installed is not None:
            return {"deploy_id": h.deploy_id, "count": h.count, "missing": [],
                    "state": installed, "version": h.version}
        missing = self.chunks.begin(h)
        return {"deploy_id": h.deploy_id, "count": h.count, **_listed(missing),
                "state": "receiving"}

    def chunk(self, deploy_id: str, index: int, sha256: str, data: str) -> dict[str, Any]:
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise DeployError(f"chunk {index}: data is not standard base64") from None
        h = self.chunks.put(deploy_id, index, sha256, raw)
        left = len(self.chunks.missing(deploy_id, h))
        return {"deploy_id": deploy_id, "index": index, "stored": True, "left": left}

    async def commit(self, deploy_id: str, activate: str) -> dict[str, Any]:
        h, onnx, manifest = await asyncio.to_thread(self.chunks.assemble, deploy_id)
        self.check_signature(h)  # again: the trusted keys may have changed since begin
        cfg = self._base(h.name)
        path = await asyncio.to_thread(self._install, cfg, h, onnx, manifest)
        previous = self.state.current(cfg)
        old_candidate, old_auto = ((previous.candidate, previous.auto) if previous
                                   else (cfg.shadow, False))
        self.state.set_candidate(cfg, str(path), auto=activate == "auto")
        errors = await asyncio.to_thread(self.stage.reload, self.configs())
        mine = [e for e in errors if f"model {h.name!r} shadow" in e]
        loaded = self.stage.candidate(h.name)
        if mine or loaded is None or loaded[0] != path:
            self.state.set_candidate(cfg, old_candidate, auto=old_auto)
            await asyncio.to_thread(self.stage.reload, self.configs())
            raise DeployError(f"version {h.version} did not start: "
                              f"{'; '.join(mine)[:400] or 'not loaded'}")
        self.chunks.drop(deploy_id)
        self.counts["installed"] += 1
        self._prune(h.name)
        self.last[h.name] = f"version {h.version} in shadow"
        state = "shadow"
        reason = None
        if activate == "force":
            reason = self.activate(h.name, force=True)
            state = "active"
        log.info("model %s: version %s installed (%s)", h.name, h.version, state)
        return {"deploy_id": deploy_id, "name": h.name, "version": h.version, "state": state,
                "activate": activate, "reason": reason}

    def _install(self, cfg: ModelConfig, h: DeployHeader, onnx: bytes,
                 manifest: bytes) -> Path:
        """Check the files as a shipped model's and move them into their version's folder."""
        from models.manifest import ModelError, verify

        final = self._version_dir(h.name, h.version)
        name = f"{h.name}.onnx"
        if final.exists():
            if _holds(final / name, h.sha256):
                return final / name
            raise DeployError(f"version {h.version} of {h.name} is installed with other "
                              "content; give the new one its own version")
        # A folder of its own: a commit that ran out of time may still be installing.
        tmp = self.models_dir / h.name / f"{INSTALL_TMP}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        try:
            write_atomic(tmp / name, onnx)
            write_atomic(tmp / f"{h.name}.json", manifest)
            verified = verify(tmp / name, runtime=cfg.runtime)
            if verified.manifest.name != h.name:
                raise ModelError(f"the manifest is for model {verified.manifest.name[:64]!r}")
            os.replace(tmp, final)
        except ModelError as exc:
            raise DeployError(f"version {h.version} refused: "
                              f"{str(exc).replace(str(tmp), final.name)[:400]}") from None
        except OSError:
            if not _holds(final / name, h.sha256):  # not installed meanwhile by a repeat
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(final.parent)
        return final / name

    def _prune(self, name: str) -> None:
        """Delete installed versions nothing can run any more (bounded disk)."""
        keep = {Path(p).parent.name for p in self.state.in_use(name)}
        folder = self.models_dir / name
        for d in folder.iterdir() if folder.is_dir() else ():
            if d.is_dir() and d.name not in keep and not d.name.startswith(INSTALL_TMP):
                log.info("model %s: version %s deleted (no longer active, candidate or a "
                         "rollback)", name, d.name)
                shutil.rmtree(d, ignore_errors=True)

    def activate(self, name: str, force: bool) -> str:
        """Promote the candidate (gated unless ``force``) and remember it."""
        info = self.stage.candidate(name)
        reason = self.stage.activate(name, force=force)
        if info is not None:
            self.state.activated(self._base(name), str(info[0]))
            self.counts["activated"] += 1
            self.last[name] = f"activated {info[0].parent.name}{' by force' if force else ''}"
        return reason

    def after_window(self) -> None:
        """Activate a deployed candidate once it has won on the live windows; now and then,
        delete the partial deploys that expired."""
        if time.monotonic() - self._swept > SWEEP_S:
            self._swept = time.monotonic()
            try:
                self.chunks.sweep()
            except OSError as exc:
                log.error("model deploys: cannot clean up expired deploys: %s", exc)
        for name, e in list(self.state.entries.items()):
            if not (e.auto and e.candidate):
                continue
            info = self.stage.candidate(name)
            if info is None or str(info[0]) != e.candidate or info[1] is None \
                    or not info[1].ok:
                continue
            log.info("model %s: the candidate won on live windows; activating it", name)
            self.activate(name, force=False)

    async def rollback(self, name: str) -> dict[str, Any]:
        was, now = self.state.rolled_back(self._base(name))
        errors = await asyncio.to_thread(self.stage.reload, self.configs())
        mine = [e for e in errors if f"model {name!r}" in e]
        self.counts["rolled_back"] += 1
        self.last[name] = f"rolled back to {Path(now).parent.name if now else 'the shipped'}"
        log.info("model %s: rolled back from %s to %s", name, was or "shipped", now or "shipped")
        return {"name": name, "from": was or "shipped", "to": now or "shipped",
                "errors": mine}

    def status(self) -> dict[str, Any]:
        return {**self.counts, "refused": dict(self.refused), "last": dict(self.last),
                "state_error": self.state.load_error, **self.chunks.status()}


def _listed(missing: list[int]) -> dict[str, Any]:
    """The missing chunk indices, the first ``MISSING_LISTED`` of them, and how many."""
    return {"missing": missing[:MISSING_LISTED], "missing_count": len(missing)}


def _holds(path: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False
