"""Cloud commands: validated, allow-listed, answered on ``cmd/{name}/result``.

A request arrives on ``{prefix}/{gateway}/cmd/{name}`` as a JSON object in the envelope of
``agent.fleet.envelope``::

    {"id": "c-42", "args": {"name": "bme"}, "gateway": "gw-7", "issued_at": "...",
     "expires_at": "...", "sig": {...}}

``id`` (1..128 printable characters) is echoed in the reply for correlation. Only the names in
``ARGS`` are accepted, and their ``args`` are validated by the matching model before a handler
runs; the commands in ``STATE_CHANGING`` must also be signed by a trusted key (unless
``[commands] require_signature = false``), so a handler only ever sees validated, verified
args. Whatever happens, a reply goes out (``ok`` true with ``result``, or false with an
``error`` code and message) and the agent keeps running: a bad request costs one reply, and
``handle`` never raises.

The payload is parsed by ``agent.jsontext`` (bounded size and nesting, no NaN or Infinity, no
integer of more than 40 digits), so no text reaches a recursive parser unchecked.

A retained request is not run: the broker hands it to every new session, so running it would
repeat it on each reconnect. It is answered ``retained`` and counted. A request whose id was
seen before is answered with the reply it got the first time, without running again: recent
ones from memory (a repeat that arrives while the first still runs waits for its reply), older
ones, across restarts, from ``agent.uplink.seen``. ``busy`` replies are not remembered: the
cloud may retry those. The envelope is checked before the id: a repeat after expiry is
``expired``, and an unsigned copy of a signed command's id never reaches its reply.

Error codes: ``too_large``, ``malformed`` (not JSON, or JSON the agent refuses: too deep,
non-finite or over-long numbers), ``invalid_request`` (not an object, bad or missing id, bad
times), ``retained``, ``wrong_gateway``, ``expired``, ``issued_in_future``, ``unsigned``,
``malformed_signature``, ``unknown_key``, ``bad_signature``, ``duplicate`` (the id ran before
but its reply is not kept), ``unknown_command``, ``bad_args``, ``unavailable`` (allowed but no
handler in this agent), ``busy`` (too many commands running), ``timeout``, ``failed`` (the
handler refused: ValueError, LookupError, CommandError), ``internal`` (any other exception;
logged). Every refusal before a handler runs is counted by code (``refused`` in ``stats``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Final, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.fleet.config_apply import ConfigApplyArgs, ConfigRollbackArgs
from agent.fleet.envelope import (
    CLOCK_SKEW_S,
    MAX_LIFETIME_S,
    CommandRequest,
    Refusal,
    check,
)
from agent.fleet.firmware_args import FirmwareFlashArgs
from agent.fleet.model_args import ModelDeployArgs, ModelRollbackArgs
from agent.fleet.signing import TrustedKeys
from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json
from agent.uplink.seen import SeenCommands

log = logging.getLogger(__name__)

SCHEMA_RESULT: Final = "edge-agent/cmd-result/1"
MAX_COMMAND_BYTES: Final = 16 * 1024
MAX_RESULT_BYTES: Final = 128 * 1024
COMMAND_TIMEOUT_S: Final = 10.0
MAX_RUNNING: Final = 4
REPLAY_CACHE: Final = 256  # replies remembered, by (command, id), to answer a repeat

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
ErrorCode = Literal["too_large", "malformed", "invalid_request", "retained", "wrong_gateway",
                    "expired", "issued_in_future", "unsigned", "malformed_signature",
                    "unknown_key", "bad_signature", "duplicate", "unknown_command", "bad_args",
                    "unavailable", "busy", "timeout", "failed", "internal"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(_Strict):
    pass


class ConfigGetArgs(_Strict):
    section: str | None = Field(default=None, description="One top-level section, or all.")


class SensorsReadArgs(_Strict):
    name: str | None = Field(default=None, description="One sensor, or all.")


class ModelActivateArgs(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="The model to make active.")
    force: bool = Field(False, description=(
        "Activate even if the candidate has not beaten the active model and persistence on "
        "the live windows."))


# The allow-list: command name -> the model its args must satisfy.
ARGS: Final[Mapping[str, type[BaseModel]]] = {
    "ping": NoArgs,
    "config.get": ConfigGetArgs,
    "outbox.stats": NoArgs,
    "sensors.read": SensorsReadArgs,
    "model.activate": ModelActivateArgs,
    "config.apply": ConfigApplyArgs,
    "config.rollback": ConfigRollbackArgs,
    "model.deploy": ModelDeployArgs,
    "model.rollback": ModelRollbackArgs,
    "firmware.flash": FirmwareFlashArgs,
}
# Commands that change the gateway: with `[commands] require_signature` (the default) they run
# only when signed by a trusted key.
STATE_CHANGING: Final = frozenset({"model.activate", "config.apply", "config.rollback",
                                   "model.deploy", "model.rollback", "firmware.flash"})


class CommandErrorBody(_Strict):
    code: ErrorCode
    message: str


class CommandResult(_Strict):
    """What the gateway answers on ``cmd/{name}/result``."""

    schema_: Literal["edge-agent/cmd-result/1"] = Field(default=SCHEMA_RESULT, alias="schema")
    id: str | None = Field(description="The request id; null when it could not be read.")
    name: str
    ok: bool
    result: Any = Field(default=None, description=(
        "The command's answer when ok (null otherwise): ping {pong, mono_s}; config.get the "
        "config, or one section of it, as JSON; outbox.stats the health message's `outbox` "
        "object; sensors.read {sensors: [...]} shaped as health's `sensors`; model.activate "
        "{activated, force, reason}; config.apply {deployment, state, sha256, ...} at once and "
        "again when the trial ends (docs/fleet.md); config.rollback the same record; "
        "model.deploy and model.rollback the deploy's progress or outcome (docs/fleet.md)."))
    error: CommandErrorBody | None = Field(default=None,
                                           description="Why it failed, when not ok.")
    gateway: str
    ts: datetime

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True,
                              validate_by_name=True, validate_by_alias=True)


class CommandError(Exception):
    """Raised by a handler to refuse with a message the cloud should see."""


def _summary(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


class CommandDispatcher:
    # The envelope's signature is checked here (``STATE_CHANGING``, ``agent.fleet.envelope``).
    verifies_signatures: ClassVar[bool] = True

    def __init__(self, handlers: Mapping[str, Handler] | None = None, *,
                 trusted: TrustedKeys | None = None, require_signature: bool = True,
                 seen: SeenCommands | None = None,
                 max_bytes: int = MAX_COMMAND_BYTES, timeout_s: float = COMMAND_TIMEOUT_S,
                 max_running: int = MAX_RUNNING) -> None:
        self._handlers: dict[str, Handler] = {"ping": self._ping}
        for name, fn in (handlers or {}).items():
            if name not in ARGS:
                raise ValueError(f"{name!r} is not an allowed command ({', '.join(ARGS)})")
            self._handlers[name] = fn
        self.trusted = trusted if trusted is not None else TrustedKeys({})
        self.require_signature = require_signature
        self.seen = seen
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_running = max_running
        self.running = 0
        self.counts: dict[str, int] = {"ok": 0, "error": 0, "retained": 0, "repeated": 0}
        self.refused: dict[str, int] = {}
        # (command, id) -> the reply, or a future of it while the first request still runs.
        self._replies: collections.OrderedDict[
            tuple[str, str], asyncio.Future[CommandResult]] = collections.OrderedDict()

    def provide(self, name: str, handler: Handler) -> None:
        """Install ``handler`` for ``name`` unless the runtime already supplied one."""
        if name not in ARGS:
            raise ValueError(f"{name!r} is not an allowed command")
        self._handlers.setdefault(name, handler)

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    async def _ping(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "mono_s": round(time.monotonic(), 3)}

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "refused": dict(self.refused), "running": self.running,
                "available": self.names, "require_signature": self.require_signature,
                "trusted_keys": self.trusted.ids,
                "seen_ids": len(self.seen) if self.seen is not None else None}

    async def handle(self, gateway: str, name: str, payload: bytes, *,
                     retained: bool = False) -> CommandResult:
        """Validate and run one request; never raises (except cancellation)."""
        try:
            return await self._handle(gateway, name, payload, retained)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours must cost one reply, not the session
            log.exception("command %r failed unexpectedly", name)
            self.counts["error"] += 1
            return CommandResult(id=None, name=name[:200], ok=False, gateway=gateway,
                                 ts=datetime.now(UTC), error=CommandErrorBody(
                                     code="internal", message=type(exc).__name__))

    def _fail(self, gateway: str, name: str, req_id: str | None, code: ErrorCode,
              message: str, *, refusal: bool = True) -> CommandResult:
        self.counts["error"] += 1
        if refusal:
            self.refused[code] = self.refused.get(code, 0) + 1
        log.info("command %r (id %r) refused: %s: %s", name, req_id, code, message)
        return CommandResult(id=req_id, name=name, ok=False, gateway=gateway,
                             ts=datetime.now(UTC),
                             error=CommandErrorBody(code=code, message=message))

    async def _handle(self, gateway: str, name: str, payload: bytes,
                      retained: bool) -> CommandResult:
        req_id: str | None = None
        if len(payload) > self.max_bytes:
            return self._fail(gateway, name, None, "too_large",
                              f"{len(payload)} bytes; the limit is {self.max_bytes}")
        try:
            data = parse_json(payload, max_bytes=self.max_bytes)
        except JsonRefused as exc:
            return self._fail(gateway, name, None, "malformed", str(exc))
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            req_id = data["id"][:128]
        try:
            req = CommandRequest.model_validate(data)
        except ValidationError as exc:
            return self._fail(gateway, name, req_id, "invalid_request", _summary(exc))
        req_id = req.id
        if retained:
            self.counts["retained"] += 1
            return self._fail(gateway, name, req_id, "retained",
                              "a retained command is not run (the broker would repeat it on "
                              "every reconnect); publish it with retain off")
        if name not in ARGS:
            return self._fail(gateway, name, req_id, "unknown_command",
                              f"{name!r} is not a command (allowed: {', '.join(ARGS)})")
        now = datetime.now(UTC)
        verdict = check(req, gateway=gateway, name=name, now=now, trusted=self.trusted,
                        signature_required=self.require_signature and name in STATE_CHANGING)
        if isinstance(verdict, Refusal):
            return self._fail(gateway, name, req_id, _code(verdict.code), verdict.message)
        key = (name, req_id)
        first = self._replies.get(key)
        if first is not None:
            self.counts["repeated"] += 1
            log.info("command %r (id %r) is a repeat: answered with the first reply", name,
                     req_id)
            return await asyncio.shield(first)
        # On disk: what changes the gateway. Read-only requests are remembered in memory only,
        # so a flood of them cannot push a signed command's id out of the table (and let it be
        # replayed before it expires).
        seen = self.seen if name in STATE_CHANGING else None
        earlier = seen.lookup(name, req_id) if seen is not None else None
        if earlier is not None:
            self.counts["repeated"] += 1
            state, reply = earlier
            if reply is not None:
                with contextlib.suppress(ValidationError):
                    return CommandResult.model_validate_json(reply)
            why = ("its run was cut short (the agent stopped)" if state == "running" else
                   "its reply was too large to keep")
            return self._fail(gateway, name, req_id, "duplicate",
                              f"this id was received before and is not run again; {why}")
        fut: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._replies[key] = fut
        while len(self._replies) > REPLAY_CACHE:
            self._replies.popitem(last=False)
        if seen is not None:
            until = verdict.expires_at or now + timedelta(seconds=MAX_LIFETIME_S)
            seen.begin(name, req_id, int((until.timestamp() + CLOCK_SKEW_S) * 1e9))
        try:
            out = await self._run(gateway, name, req_id, req.args)
        except BaseException:
            self._replies.pop(key, None)
            fut.cancel()
            raise
        fut.set_result(out)
        if out.error is not None and out.error.code == "busy":
            self._replies.pop(key, None)
            if seen is not None:
                seen.forget(name, req_id)
        elif seen is not None:
            seen.finish(name, req_id, encode_result(out))
        return out

    async def _run(self, gateway: str, name: str, req_id: str,
                   raw_args: dict[str, Any]) -> CommandResult:
        def fail(code: ErrorCode, message: str) -> CommandResult:
            return self._fail(gateway, name, req_id, code, message,
                              refusal=code in ("bad_args", "unavailable", "busy"))

        model = ARGS[name]
        try:
            args = model.model_validate(raw_args).model_dump()
        except ValidationError as exc:
            return fail("bad_args", _summary(exc))
        handler = self._handlers.get(name)
        if handler is None:
            return fail("unavailable", f"{name!r} is not available in this agent")
        if self.running >= self.max_running:
            return fail("busy", f"{self.running} commands are already running")
        self.running += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await handler(args)
        except TimeoutError:
            return fail("timeout", f"no result within {self.timeout_s:g} s")
        except (CommandError, ValueError, LookupError) as exc:
            return fail("failed", str(exc)[:500] or type(exc).__name__)
        except Exception as exc:
            log.exception("command %r (id %r) failed", name, req_id)
            return fail("internal", f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            self.running -= 1
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            return fail("internal", f"the result cannot be sent as JSON: {str(exc)[:200]}")
        out = CommandResult(id=req_id, name=name, ok=True, result=result, gateway=gateway,
                            ts=datetime.now(UTC))
        if len(encode_result(out)) > MAX_RESULT_BYTES:
            return fail("internal", f"the result is larger than {MAX_RESULT_BYTES} bytes")
        self.counts["ok"] += 1
        return out


def _code(text: str) -> ErrorCode:
    codes: tuple[str, ...] = get_args(ErrorCode)
    return cast(ErrorCode, text) if text in codes else "internal"


def encode_result(r: CommandResult) -> bytes:
    return CommandResult.__pydantic_serializer__.to_json(r, by_alias=True)
