"""The cloud side of ``model.deploy``: sign a model, send it in chunks, resume, collect results.

``deploy_model(commander, gateway, onnx_path, manifest_path, key)`` signs the artifact (domain
``model``), sends ``begin``, then only the chunks the gateway says it lacks (a few in flight),
then ``commit``, and returns a ``DeployResult``. Called again with the same files after an
interruption (broker restart, gateway restart, lost replies) it sends only what is still
missing: the deploy id is derived from the model's name and version.

A ``Commander`` sends one command and waits for its reply. ``MqttCommander`` is one over a
connected ``aiomqtt.Client``: one subscription to every result topic, replies routed by
gateway, command and id, so one connection serves deploys to many gateways at once. Its
``envelope`` hook builds the request around the args (plain ``{"id", "args"}`` by default).

Importable without the agent running; aiomqtt is used only through the object passed in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from agent.fleet.chunks import artifact_body
from agent.fleet.model_args import MAX_CHUNK
from agent.fleet.signing import SigningKey
from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json

COMMAND: Final = "model.deploy"
RETRIES: Final = 3
BUSY_PAUSE_S: Final = 0.2
MAX_REPLY_BYTES: Final = 256 * 1024

Envelope = Callable[[str, str, str, dict[str, Any]], dict[str, Any]]


class DeployInterrupted(Exception):
    """The connection to the broker went away mid-deploy; call again to resume."""


class Commander(Protocol):
    async def request(self, gateway: str, name: str, args: dict[str, Any],
                      timeout_s: float) -> dict[str, Any]:
        """Send one command; return its reply (the ``cmd-result`` document). Raises
        TimeoutError without a reply, DeployInterrupted when the connection is lost."""
        ...


def plain_envelope(gateway: str, name: str, req_id: str, args: dict[str, Any]) -> dict[str, Any]:
    del gateway, name
    return {"id": req_id, "args": args}


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def signed_envelope(key: SigningKey, lifetime_s: float = 3600.0) -> Envelope:
    """Requests signed by ``key`` (domain ``cmd``) over ``{gateway, name, id, issued_at,
    expires_at, args}``, valid for ``lifetime_s``: what a gateway that requires signatures on
    state-changing commands runs."""

    def wrap(gateway: str, name: str, req_id: str, args: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC)
        issued, expires = _stamp(now), _stamp(now + timedelta(seconds=lifetime_s))
        body = {"gateway": gateway, "name": name, "id": req_id, "issued_at": issued,
                "expires_at": expires, "args": args}
        return {"id": req_id, "args": args, "gateway": gateway, "issued_at": issued,
                "expires_at": expires, "sig": key.sign("cmd", body)}

    return wrap


class MqttCommander:
    """Commands over a connected aiomqtt client; use as ``async with MqttCommander(c):``."""

    def __init__(self, client: Any, prefix: str = "edge",
                 envelope: Envelope = plain_envelope) -> None:
        self.client = client
        self.prefix = prefix
        self.envelope = envelope
        self._waiting: dict[tuple[str, str, str], asyncio.Future[dict[str, Any]]] = {}
        self._pump: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None
        self._gone = asyncio.Event()

    async def __aenter__(self) -> MqttCommander:
        await self.client.subscribe(f"{self.prefix}/+/cmd/+/result", qos=1, timeout=10)
        self._pump = asyncio.create_task(self._route(), name="fleet-results")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump

    async def _route(self) -> None:
        lost: BaseException
        try:
            async for m in self.client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                try:  # from the broker: bounded size, depth and numbers
                    body = parse_json(payload, max_bytes=MAX_REPLY_BYTES)
                except JsonRefused:
                    continue
                if not isinstance(body, dict):
                    continue
                key = (str(body.get("gateway")), str(body.get("name")), str(body.get("id")))
                fut = self._waiting.get(key)
                if fut is not None and not fut.done():
                    fut.set_result(body)
            lost = ConnectionError("the message stream ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's error when the broker goes away
            lost = exc
        self._lost = lost
        self._gone.set()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(DeployInterrupted(f"connection lost: {lost}"))

    async def _publish(self, topic: str, payload: bytes, timeout_s: float) -> None:
        """Publish at QoS 1; a connection that goes away meanwhile ends the wait at once (the
        client itself would wait for a PUBACK until ``timeout_s``)."""
        pub = asyncio.ensure_future(self.client.publish(topic, payload, qos=1,
                                                        timeout=timeout_s))
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({pub, gone}, timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not pub.done():
            pub.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pub
            if self._lost is not None:
                raise DeployInterrupted(f"connection lost: {self._lost}")
            raise TimeoutError
        try:
            pub.result()
        except Exception as exc:
            raise DeployInterrupted(f"publish failed: {exc}") from exc

    async def request(self, gateway: str, name: str, args: dict[str, Any],
                      timeout_s: float) -> dict[str, Any]:
        if self._lost is not None:
            raise DeployInterrupted(f"connection lost: {self._lost}")
        req_id = uuid.uuid4().hex[:16]
        key = (gateway, name, req_id)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        try:
            payload = json.dumps(self.envelope(gateway, name, req_id, args)).encode()
            await self._publish(f"{self.prefix}/{gateway}/cmd/{name}", payload, timeout_s)
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            self._waiting.pop(key, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # seen: the publish's own error is what the caller gets
            fut.cancel()


@dataclass
class DeployResult:
    gateway: str
    ok: bool
    deploy_id: str
    version: str
    state: str = ""  # receiving, shadow, active
    chunks: int = 0
    sent: int = 0  # chunks sent by this call (a resumed deploy sends fewer)
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


def begin_args(key: SigningKey | None, *, name: str, version: str, onnx: bytes,
               manifest: bytes, target: str, deploy_id: str,
               chunk_size: int = MAX_CHUNK) -> dict[str, Any]:
    """The signed ``begin`` of a deploy (``key`` None: unsigned)."""
    body = artifact_body(name=name, version=version, sha256=hashlib.sha256(onnx).hexdigest(),
                         size=len(onnx), manifest_sha256=hashlib.sha256(manifest).hexdigest(),
                         manifest_size=len(manifest), gateway=target)
    return {"op": "begin", "deploy_id": deploy_id, **body, "chunk_size": chunk_size,
            "sig": key.sign("model", body) if key is not None else None}


class _Failed(Exception):
    pass


async def _call(commander: Commander, gateway: str, args: dict[str, Any],
                timeout_s: float) -> dict[str, Any]:
    """One step, retried on a lost reply or ``busy``; returns its ``result``."""
    last = "no reply"
    for _ in range(RETRIES):
        try:
            reply = await commander.request(gateway, COMMAND, args, timeout_s)
        except TimeoutError:
            last = f"no reply within {timeout_s:g} s"
            continue
        if reply.get("ok") is True:
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        error = reply.get("error") or {}
        code, message = error.get("code"), error.get("message")
        if code in ("busy", "timeout"):
            # Every step can be repeated: a chunk stored twice is kept once, and a commit that
            # ran out of time finds what it already installed.
            last = f"{code}: {message}"
            await asyncio.sleep(BUSY_PAUSE_S)
            continue
        raise _Failed(f"{args['op']}: {code}: {message}")
    raise _Failed(f"{args['op']}: {last}")


def _count(value: object, limit: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise _Failed(f"the gateway's reply has no valid {what}")
    return value


def _missing(result: dict[str, Any], count: int) -> tuple[list[int], int]:
    """The chunk indices a reply lists as missing, and how many are missing in all."""
    listed = result.get("missing")
    if not isinstance(listed, list):
        raise _Failed("the gateway's reply has no list of missing chunks")
    indices = [_count(i, count - 1, "chunk index") for i in listed]
    total = result.get("missing_count", len(indices))
    return sorted(set(indices)), _count(total, count, "missing_count")


async def deploy_model(commander: Commander, gateway: str, onnx_path: Path,
                       manifest_path: Path, key: SigningKey | None, *,
                       name: str | None = None, version: str | None = None,
                       target: str | None = None, deploy_id: str | None = None,
                       activate: Literal["auto", "manual", "force"] = "auto",
                       chunk_size: int = MAX_CHUNK, in_flight: int = 2,
                       timeout_s: float = 15.0,
                       progress: Callable[[int, int], None] | None = None) -> DeployResult:
    """Deploy one model to ``gateway``; resumes what an earlier call left. Raises
    DeployInterrupted when the connection is lost (call again to resume); every other
    failure is in the result."""
    onnx = await asyncio.to_thread(onnx_path.read_bytes)
    manifest = await asyncio.to_thread(manifest_path.read_bytes)
    try:
        doc = json.loads(manifest)
    except ValueError:
        raise ValueError(f"{manifest_path}: not a JSON manifest") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{manifest_path}: not a JSON manifest")
    name = name or str(doc.get("name") or onnx_path.stem)
    version = version or str(doc.get("version") or hashlib.sha256(onnx).hexdigest()[:12])
    deploy_id = deploy_id or f"{name}-{version}"[:64]
    out = DeployResult(gateway, False, deploy_id, version)
    whole = onnx + manifest
    try:
        began = await _call(commander, gateway, begin_args(
            key, name=name, version=version, onnx=onnx, manifest=manifest,
            target=target or gateway, deploy_id=deploy_id, chunk_size=chunk_size), timeout_s)
        out.chunks = _count(began.get("count"), 1 << 32, "count")
        out.state = str(began.get("state", ""))[:32]
        if out.state in ("shadow", "active"):  # this very version already runs there
            out.ok, out.result = True, began
            return out
        missing, left = _missing(began, out.chunks)
        done = out.chunks - left
        gate = asyncio.Semaphore(max(1, in_flight))

        async def send(i: int) -> None:
            nonlocal done
            data = whole[i * chunk_size:(i + 1) * chunk_size]
            async with gate:
                await _call(commander, gateway, {
                    "op": "chunk", "deploy_id": deploy_id, "index": i,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "data": base64.b64encode(data).decode()}, timeout_s)
            out.sent += 1
            done += 1
            if progress is not None:
                progress(done, out.chunks)

        # Rounds until nothing is missing; a reply lists a bounded part of what is missing,
        # so a large deploy takes several. Give up after RETRIES rounds without progress.
        stalled, left = 0, out.chunks + 1
        while missing:
            async with asyncio.TaskGroup() as tg:
                for i in missing:
                    tg.create_task(send(i), name=f"deploy-chunk-{gateway}-{i}")
            status = await _call(commander, gateway, {"op": "status", "deploy_id": deploy_id},
                                 timeout_s)
            missing, now_left = _missing(status, out.chunks)
            stalled = stalled + 1 if now_left >= left else 0
            left = now_left
            if stalled >= RETRIES:
                raise _Failed(f"{left} chunks still missing after {RETRIES} rounds without "
                              "progress")
        out.result = await _call(commander, gateway, {"op": "commit", "deploy_id": deploy_id,
                                                      "activate": activate}, timeout_s)
        out.state = str(out.result.get("state", ""))[:32]
        out.ok = True
    except* _Failed as group:
        out.error = "; ".join(str(e) for e in group.exceptions)[:1000]
    except* DeployInterrupted as group:
        raise group.exceptions[0] from None
    return out


async def deploy_many(commander: Commander, gateways: Sequence[str], onnx_path: Path,
                      manifest_path: Path, key: SigningKey | None, *, concurrency: int = 64,
                      **kwargs: Any) -> dict[str, DeployResult]:
    """``deploy_model`` to each gateway (``concurrency`` at a time, one artifact signature for
    all: target ``*``); a gateway whose deploy was interrupted has ``error`` set, and a second
    call resumes it."""
    gate = asyncio.Semaphore(max(1, concurrency))
    out: dict[str, DeployResult] = {}

    async def one(gw: str) -> None:
        async with gate:
            try:
                out[gw] = await deploy_model(commander, gw, onnx_path, manifest_path, key,
                                             target="*", **kwargs)
            except DeployInterrupted as exc:
                out[gw] = DeployResult(gw, False, "", "", error=f"interrupted: {exc}")
            except Exception as exc:  # one gateway's failure must not cost the others'
                out[gw] = DeployResult(gw, False, "", "", error=f"{type(exc).__name__}: "
                                                                f"{str(exc)[:500]}")

    async with asyncio.TaskGroup() as tg:
        for gw in gateways:
            tg.create_task(one(gw), name=f"deploy-{gw}")
    return {gw: out[gw] for gw in gateways}
