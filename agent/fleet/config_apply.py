"""``config.apply`` and ``config.rollback``: a whole config from the cloud, on trial, undoable.

``config.apply`` (args ``{"config": TOML text}``) checks the text exactly as
`edge-agent config check` does (validation, cross-checks, ``agent.preflight``); a config that
fails is refused with the check's lines and nothing on disk changes. A config that passes is
written atomically over the config file (the one it replaces kept as ``.previous``), recorded
as a deployment on ``trial`` (``agent.fleet.config_files``) and started as a new generation
through the reload path. The immediate reply says ``trial`` with the deployment id and what
changed.

The trial ends ``confirmed`` once the new generation is healthy (``config_files.trial_problems``:
every enabled sensor up, uplink connected, the pipeline making progress, for one second), or
``rolled_back`` when it is not within ``[commands] apply_health_timeout_s``: the previous file
is written back and started again, by itself. Either outcome goes out as a second result on
``cmd/config.apply/result`` (``id`` is the deployment id; resent until the broker acknowledges
it, across restarts) and is in every health message under ``config_apply``.

An agent restarted during a trial finds the record: if it is running the config on trial, the
trial starts again with a full timeout (and rolls back if that config is not healthy); if it
stopped in the middle of a rollback, the rollback is finished. ``config.rollback`` goes back to
``.previous`` on request, during a trial or after it was confirmed; there is one step back,
never a toggle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Protocol

from pydantic import BaseModel, ConfigDict, Field

from agent.config.load import MAX_CONFIG_BYTES
from agent.config.schema import AgentConfig
from agent.fleet.config_files import (
    HEALTHY_FOR_S,
    DeployRecord,
    State,
    changed,
    file_mode,
    load_record,
    read_regular,
    save_record,
    sibling,
    sync_dir,
    trial_problems,
    write_atomic,
)

log = logging.getLogger(__name__)

MAX_APPLY_CONFIG_CHARS: Final = 48 * 1024
"""The TOML text ``config.apply`` takes (a gateway's file is a few KiB)."""
MAX_APPLY_PAYLOAD_BYTES: Final = 64 * 1024
"""What the command dispatcher must accept for it: the text JSON-escaped, plus the envelope."""
RESTART_SECTIONS: Final = ("control", "web", "sparkplug")
"""Sections whose objects live across reloads: a change to them takes effect at a restart."""
POLL_S: Final = 0.25
REPORT_RETRY_S: Final = 2.0

Checker = Callable[[Path], tuple[AgentConfig | None, list[str]]]
"""A config file -> (the config, problems as `config check` prints them); runs in a thread."""


class ConfigApplyArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config: Annotated[str, Field(min_length=1, max_length=MAX_APPLY_CONFIG_CHARS)] = Field(
        description="The whole new config file, as TOML text.")


class ConfigRollbackArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeployHost(Protocol):
    """What the deployer needs of the agent (``agent.runtime.Agent``)."""

    generation: int
    cfg: AgentConfig
    ready: asyncio.Event
    """Set once the first generation runs."""

    def request_reload(self) -> None: ...

    def generation_ready(self) -> bool:
        """Whether the current generation has every stage running."""
        ...

    def snapshot(self) -> dict[str, Any]: ...

    async def send_reply(self, name: str, req_id: str, ok: bool,
                         result: dict[str, Any]) -> bool:
        """Publish a late result on ``cmd/{name}/result``; True once acknowledged."""
        ...


def _now() -> float:
    return time.time()


class ConfigDeployer:
    def __init__(self, config_path: Path, host: DeployHost, check: Checker) -> None:
        self.path = config_path
        self.host = host
        self.check = check
        self.record_path = sibling(config_path, ".deploy.json")
        self.previous_path = sibling(config_path, ".previous")
        self.rejected_path = sibling(config_path, ".rejected")
        self.candidate_path = sibling(config_path, ".candidate")
        self.record: DeployRecord | None = None
        self.problems: list[str] = []  # why the trial is not healthy yet
        self.counts: dict[str, int] = {"applied": 0, "refused": 0, "confirmed": 0,
                                       "rolled_back": 0, "requested_rollbacks": 0}
        self._lock = asyncio.Lock()
        self._trial_cfg: AgentConfig | None = None
        self._trial_after_gen = 0  # the trial generation is a later one than this
        self._trial_deadline = 0.0
        self._report_after_gen = 0
        self._wake = asyncio.Event()

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
        return {"config.apply": self.apply, "config.rollback": self.rollback}

    # -- commands -------------------------------------------------------------------------

    async def apply(self, args: dict[str, Any]) -> dict[str, Any]:
        text = args.get("config")
        if not isinstance(text, str):
            raise ValueError("args.config (the TOML text) is required")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate from a JSON \ud800 escape
            raise ValueError(f"args.config: not UTF-8 text at character {exc.start}") from None
        loop = asyncio.get_running_loop()
        async with self._lock:
            rec = self.record
            if rec is not None and rec.state == "trial":
                self.counts["refused"] += 1
                raise ValueError(f"deployment {rec.deployment} is still on trial: wait for "
                                 "its outcome, or send config.rollback")
            try:
                result = await asyncio.to_thread(self._install, data, loop)
            except ValueError:
                self.counts["refused"] += 1
                raise
            self.counts["applied"] += 1
        return result

    def _install(self, data: bytes, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        """Check the candidate, keep the running file as ``.previous``, put the candidate in
        place, record the trial and start it (in a thread: it reads, builds and fsyncs). The
        reload is asked for from here, so a command that timed out meanwhile still starts the
        config it installed, and its trial still judges it."""
        try:
            current = read_regular(self.path, MAX_CONFIG_BYTES)
        except OSError as exc:
            raise ValueError(f"the running config file cannot be read: {exc}") from None
        new_sha = hashlib.sha256(data).hexdigest()
        old_sha = hashlib.sha256(current).hexdigest()
        if new_sha == old_sha:
            raise ValueError("that config is the one running already (same sha256)")
        mode = file_mode(self.path)
        try:
            write_atomic(self.candidate_path, data, mode)
        except OSError as exc:
            raise ValueError(f"cannot write beside the config file: {exc}") from None
        try:
            cfg, problems = self.check(self.candidate_path)
            if problems or cfg is None:
                raise ValueError("config check: " + "; ".join(problems[:20]))
            changes = changed(self.host.cfg.model_dump(mode="json"), cfg.model_dump(mode="json"))
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            rec = DeployRecord(deployment=f"cfg-{stamp}-{new_sha[:12]}", state="trial",
                               sha256=new_sha, previous_sha256=old_sha, changes=changes,
                               timeout_s=self.host.cfg.commands.apply_health_timeout_s,
                               started_ts=_now())
            write_atomic(self.previous_path, current, mode)
            save_record(self.record_path, rec)
            self.candidate_path.replace(self.path)
            sync_dir(self.path.parent)
        except OSError as exc:
            raise ValueError(f"cannot install the config: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                self.candidate_path.unlink()
        self.record = rec
        self._start_trial(cfg)
        loop.call_soon_threadsafe(self._wake.set)
        loop.call_soon_threadsafe(self.host.request_reload)
        log.info("config.apply: deployment %s on trial for %g s; changed: %s", rec.deployment,
                 rec.timeout_s, ", ".join(changes.keys) or "nothing")
        return {"deployment": rec.deployment, "state": "trial", "sha256": new_sha,
                "health_timeout_s": rec.timeout_s, "changes": changes.model_dump(),
                "restart_needed": [s for s in changes.sections if s in RESTART_SECTIONS]}

    def _start_trial(self, cfg: AgentConfig) -> None:
        assert self.record is not None
        self._trial_cfg = cfg
        self._trial_after_gen = self.host.generation
        self._trial_deadline = time.monotonic() + self.record.timeout_s
        self.problems = ["the new configuration is not running yet"]

    async def rollback(self, _args: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            rec = self.record
            if rec is None or rec.state not in ("trial", "confirmed"):
                raise ValueError("there is no applied config to go back from")
            self.counts["requested_rollbacks"] += 1
            await asyncio.to_thread(self._restore, "requested by config.rollback", True)
        self.host.request_reload()
        assert self.record is not None
        return {"deployment": self.record.deployment, "state": "rolled_back",
                "restored_sha256": self.record.previous_sha256}

    def _restore(self, reason: str, reported: bool) -> None:
        """Write ``.previous`` back over the config file (record first: a restart in between
        finishes the job)."""
        rec = self.record
        assert rec is not None
        try:
            previous = read_regular(self.previous_path, MAX_CONFIG_BYTES)
        except OSError as exc:
            raise ValueError(f"the previous config cannot be read: {exc}") from None
        if hashlib.sha256(previous).hexdigest() != rec.previous_sha256:
            raise ValueError(f"{self.previous_path.name} is not the config deployment "
                             f"{rec.deployment} replaced: not restored")
        self.record = rec.model_copy(update={"state": "rolled_back", "reason": reason[:4000],
                                             "ended_ts": _now(), "reported": reported})
        save_record(self.record_path, self.record)
        mode = file_mode(self.path)
        with contextlib.suppress(OSError):
            write_atomic(self.rejected_path, read_regular(self.path, MAX_CONFIG_BYTES), mode)
        write_atomic(self.path, previous, mode)
        self.previous_path.unlink(missing_ok=True)
        self._trial_cfg = None
        self._report_after_gen = self.host.generation
        self.counts["rolled_back"] += 1
        log.warning("config deployment %s rolled back: %s", rec.deployment, reason)

    # -- the trial ------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover a deployment left by a previous run, then judge trials and report outcomes;
        until cancelled."""
        if await asyncio.to_thread(self._recover):
            # The rollback a previous run left unfinished: its file is back in place; start it
            # once the first generation runs (a reload asked for earlier would be forgotten).
            await self.host.ready.wait()
            self._report_after_gen = self.host.generation
            self.host.request_reload()
        while True:
            rec = self.record
            if rec is not None and rec.state == "trial" and self._trial_cfg is not None:
                await self._judge()
            elif rec is not None and rec.state != "trial" and not rec.reported:
                await self._report()
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 60)

    def _recover(self) -> bool:
        """Pick up the record of a previous run; True when the config file was restored and
        must be started."""
        rec = load_record(self.record_path)
        self.record = rec
        if rec is None:
            return False
        try:
            on_disk = hashlib.sha256(read_regular(self.path, MAX_CONFIG_BYTES)).hexdigest()
        except OSError:
            on_disk = ""
        if on_disk != rec.sha256 or rec.state not in ("trial", "rolled_back"):
            if rec.state == "trial":  # someone replaced the file meanwhile: not ours to judge
                self._finish("abandoned", "the config file was replaced during the trial")
            return False
        if rec.state == "rolled_back":
            log.warning("config deployment %s: finishing its rollback", rec.deployment)
            try:
                self._restore(rec.reason or "rolled back before a restart", rec.reported)
            except (OSError, ValueError) as exc:
                log.error("config deployment %s cannot be rolled back: %s", rec.deployment, exc)
                self._finish("abandoned", f"{rec.reason}; the rollback failed: {exc}")
                return False
            return True
        log.warning("config deployment %s was on trial when the agent stopped: on trial "
                    "again for %g s", rec.deployment, rec.timeout_s)
        self._start_trial(self.host.cfg)
        self._trial_after_gen = 0
        return False

    async def _judge(self) -> None:
        await asyncio.sleep(POLL_S)
        healthy_since: float | None = None
        while True:
            async with self._lock:
                rec = self.record
                if rec is None or rec.state != "trial":
                    return
                now = time.monotonic()
                problems = self._trial_health()
                self.problems = problems
                if problems:
                    healthy_since = None
                elif healthy_since is None:
                    healthy_since = now
                elif now - healthy_since >= HEALTHY_FOR_S:
                    self._finish("confirmed", "")
                    self.counts["confirmed"] += 1
                    self._report_after_gen = self.host.generation - 1
                    log.info("config deployment %s confirmed", rec.deployment)
                    return
                if now >= self._trial_deadline:
                    reason = (f"not healthy within {rec.timeout_s:g} s: "
                              + "; ".join(problems or ["not healthy for long enough"]))
                    try:
                        await asyncio.to_thread(self._restore, reason, False)
                    except (OSError, ValueError) as exc:
                        log.error("config deployment %s cannot be rolled back: %s",
                                  rec.deployment, exc)
                        self._finish("abandoned", f"{reason}; the rollback failed: {exc}")
                        return
                    self.host.request_reload()
                    return
            await asyncio.sleep(POLL_S)

    def _trial_health(self) -> list[str]:
        host = self.host
        if host.generation <= self._trial_after_gen or host.cfg != self._trial_cfg:
            err = str(host.snapshot().get("agent", {}).get("last_reload_error") or "")
            return ["the new configuration is not running" + (f" ({err})" if err else "")]
        if not host.generation_ready():
            return ["the new configuration is starting"]
        return trial_problems(host.snapshot())

    def _finish(self, state: State, reason: str) -> None:
        rec = self.record
        assert rec is not None
        self.record = rec.model_copy(update={"state": state, "reason": reason[:4000],
                                             "ended_ts": _now(), "reported": False})
        self._trial_cfg = None
        self.problems = []
        try:
            save_record(self.record_path, self.record)
        except OSError as exc:  # the outcome still goes out; only a restart would forget it
            log.error("config deployment record %s cannot be written: %s", self.record_path,
                      exc)

    async def _report(self) -> None:
        """Send the outcome once the generation it concerns is running; retry until acked."""
        rec = self.record
        assert rec is not None
        if self.host.generation > self._report_after_gen and self.host.generation_ready():
            ok = rec.state == "confirmed"
            sent = await self.host.send_reply("config.apply", rec.deployment, ok,
                                              self.outcome(rec))
            if sent:
                async with self._lock:
                    if self.record is rec:
                        self.record = rec.model_copy(update={"reported": True})
                        with contextlib.suppress(OSError):
                            await asyncio.to_thread(save_record, self.record_path, self.record)
                return
        await asyncio.sleep(REPORT_RETRY_S if self.host.generation_ready() else POLL_S)

    @staticmethod
    def outcome(rec: DeployRecord) -> dict[str, Any]:
        return {"deployment": rec.deployment, "state": rec.state, "sha256": rec.sha256,
                "reason": rec.reason, "changes": rec.changes.model_dump()}

    def status(self) -> dict[str, Any]:
        """For health: the last deployment, and why a trial is not healthy yet."""
        rec = self.record
        out: dict[str, Any] = {"counts": dict(self.counts)}
        if rec is not None:
            out.update(self.outcome(rec))
            out["reported"] = rec.reported
            out["timeout_s"] = rec.timeout_s
            if rec.state == "trial":
                out["problems"] = self.problems[:20]
                out["remaining_s"] = round(max(0.0, self._trial_deadline - time.monotonic()), 1)
        return out
