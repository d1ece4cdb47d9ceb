"""The deploy half of ``bench.fleet``: gateways that take ``model.deploy``, and the cloud side.

Each simulated gateway is wired as the agent wires one: a ``CommandDispatcher`` on its
``Uplink``, with the ``model.deploy`` and ``model.rollback`` handlers of its own
``ModelDeployments`` over a real ``InferenceStage`` (onnxruntime; no pipeline feeds it, so a
deployed model stays in shadow), all under the gateway's own directory. Every gateway trusts one
generated operator key (``[commands] trusted_keys``) and requires signatures.

The cloud side is its own process: one MQTT connection, one ``MqttCommander``, and
``deploy_many`` with one artifact signature (target ``*``) for the whole fleet. Its baseline,
over the same commander in the same run, is one ``ping`` round trip per gateway at the same
concurrency.

Where this code base's dispatcher verifies command signatures, requests go out signed
(``signed_envelope``) and the dispatcher is given the trusted key; where it does not, they go
out plain and only the artifact's signature is checked (by ``ModelDeployments``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import importlib
import inspect
import logging
import re
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.config.load import parse_config
from agent.config.schema import AgentConfig, MqttConfig
from agent.fleet.deploy_client import (
    Envelope,
    MqttCommander,
    deploy_many,
    plain_envelope,
    signed_envelope,
)
from agent.fleet.model_deploy import ModelDeployments
from agent.fleet.signing import SigningKey, TrustedKeys
from agent.outbox.store import Outbox
from agent.pipeline.infer import InferenceStage
from agent.uplink.commands import CommandDispatcher
from agent.uplink.forwarder import Uplink

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "energy.onnx"
MANIFEST = MODEL.with_suffix(".json")
CONCURRENCY = 64  # gateways the cloud deploys to at once (deploy_many's default)

_PARAMS = inspect.signature(CommandDispatcher).parameters
# A dispatcher that checks command signatures takes the trusted keys (or says so).
SIGNED_COMMANDS = bool(getattr(CommandDispatcher, "verifies_signatures", False)
                       or "trusted" in _PARAMS)


def gateway_config(gw: str, root: Path, mqtt: MqttConfig, key_id: str,
                   public: str) -> AgentConfig:
    """A gateway with the shipped energy model active, trusting one operator key."""
    cfg = parse_config({
        "gateway": {"id": gw},
        "outbox": {"path": str(root / "outbox.db")},
        "sensors": [{"name": "meter", "driver": "synthetic", "enabled": False}],
        "streams": [{"name": "cabinet", "sensors": ["meter"], "window_s": 300}],
        "models": [{"name": "energy", "stream": "cabinet", "path": str(MODEL)}],
        "commands": {"require_signature": True,
                     "trusted_keys": [{"id": key_id, "public_key": public}]},
    })
    return cfg.model_copy(update={"mqtt": mqtt})


class FleetGateway:
    """One simulated gateway: outbox, uplink, dispatcher, deploys and the inference stage."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.id = cfg.gateway.id
        Path(cfg.outbox.path).parent.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(cfg.outbox, self.id)
        self.outbox.open()
        self.stage = InferenceStage()
        self.deployments = ModelDeployments(cfg, self.stage)
        errors = self.stage.reload(self.deployments.configs())
        if errors:
            raise RuntimeError(f"{self.id}: the shipped model did not load: {errors}")
        extra: dict[str, Any] = {}
        if "trusted" in _PARAMS:
            extra["trusted"] = TrustedKeys(cfg.commands.trusted())
        if "require_signature" in _PARAMS:
            extra["require_signature"] = cfg.commands.require_signature
        self.seen = _seen_ids(Path(cfg.outbox.path).parent)
        if self.seen is not None:
            extra["seen"] = self.seen
        self.commands = CommandDispatcher(self.deployments.handlers(), **extra)
        self.uplink = Uplink(cfg.mqtt, self.id, self.outbox, self.commands)

    def deployed(self, sha256: str) -> str | None:
        """None when the deployed model runs here in shadow with the shipped bytes; else why
        not."""
        info = self.stage.candidate("energy")
        if info is None:
            return "no candidate"
        path = info[0]
        if path == MODEL or "models" not in path.parts:
            return f"candidate is {path.name}, not an installed version"
        try:
            same = hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        except OSError as exc:
            return f"installed file unreadable: {exc.strerror}"
        return None if same else "installed file differs"

    def close(self) -> None:
        self.stage.close()
        if self.seen is not None:
            self.seen.close()


def _seen_ids(root: Path) -> Any:
    """The gateway's SQLite table of command ids beside its outbox, where this code base's
    dispatcher keeps one (its ``seen``); else None."""
    if "seen" not in _PARAMS:
        return None
    mod = importlib.import_module("agent.uplink.seen")  # absent where ids are not kept
    seen = mod.SeenCommands(root / mod.SEEN_FILE)
    seen.open()
    return seen


def check_deployed(gateways: list[FleetGateway]) -> dict[str, Any]:
    """What the gateways themselves say about the deploy (independent of the cloud's view)."""
    sha = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    wrong: dict[str, str] = {}
    refused: collections.Counter[str] = collections.Counter()
    refused_commands: collections.Counter[str] = collections.Counter()
    commands: collections.Counter[str] = collections.Counter()
    for g in gateways:
        why = g.deployed(sha)
        if why is not None:
            wrong[g.id] = why
        refused.update(g.deployments.refused)
        refused_commands.update(getattr(g.commands, "refused", {}))  # where it counts them
        commands.update({k: v for k, v in g.commands.counts.items() if isinstance(v, int)})
    return {"in_shadow": len(gateways) - len(wrong), "wrong": wrong,
            "refused": dict(refused), "refused_commands": dict(refused_commands),
            "commands": dict(commands)}


# -- the cloud side ----------------------------------------------------------------------


class TimedCommander:
    """A commander that notes, per gateway, its first request and its last reply."""

    def __init__(self, inner: MqttCommander) -> None:
        self.inner = inner
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.requests = 0

    async def request(self, gateway: str, name: str, args: dict[str, Any],
                      timeout_s: float) -> dict[str, Any]:
        self.first.setdefault(gateway, time.monotonic())
        self.requests += 1
        try:
            return await self.inner.request(gateway, name, args, timeout_s)
        finally:
            self.last[gateway] = time.monotonic()

    def per_gateway_s(self) -> list[float]:
        return [self.last[g] - t for g, t in self.first.items() if g in self.last]


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
    if len(xs) == 1:
        return {"p50_s": xs[0], "p99_s": xs[0], "max_s": xs[0]}
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50_s": round(q[49], 3), "p99_s": round(q[98], 3), "max_s": round(max(xs), 3)}


def _reason(error: str) -> str:
    """A failure's reason without its numbers and ids, so alike failures group."""
    return re.sub(r"\d+(\.\d+)?", "N", error.split(";", maxsplit=1)[0])[:120]


async def _pings(commander: TimedCommander, ids: list[str]) -> dict[str, Any]:
    gate = asyncio.Semaphore(CONCURRENCY)
    failed: collections.Counter[str] = collections.Counter()

    async def one(gw: str) -> None:
        async with gate:
            try:
                reply = await commander.request(gw, "ping", {}, 15.0)
            except Exception as exc:  # counted and reported; the others go on
                failed[_reason(f"{type(exc).__name__}: {exc}")] += 1
                return
            if reply.get("ok") is not True:
                failed[_reason(str(reply.get("error")))] += 1

    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for gw in ids:
            tg.create_task(one(gw))
    total = time.monotonic() - t0
    return {"ok": len(ids) - sum(failed.values()), "failed": dict(failed),
            "total_s": round(total, 2), **_percentiles(commander.per_gateway_s())}


async def run_cloud(host: str, port: int, prefix: str, ids: list[str],
                      key_path: str) -> dict[str, Any]:
    import aiomqtt

    # aiomqtt (at import) sets its logger to warn whenever more than ten publishes wait for
    # their PUBACK: here, by design.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    key = SigningKey.load(Path(key_path))
    envelope: Envelope = signed_envelope(key) if SIGNED_COMMANDS else plain_envelope
    async with aiomqtt.Client(host, port, identifier="fleet-bench-ops", timeout=30) as client, \
            MqttCommander(client, prefix, envelope) as mc:
        ping = await _pings(TimedCommander(mc), ids)
        timed = TimedCommander(mc)
        t0 = time.monotonic()
        results = await deploy_many(timed, ids, MODEL, MANIFEST, key, concurrency=CONCURRENCY)
        total = time.monotonic() - t0
    failed: collections.Counter[str] = collections.Counter(
        _reason(r.error or f"not ok (state {r.state!r})") for r in results.values() if not r.ok)
    states = collections.Counter(r.state for r in results.values() if r.ok)
    deploy = {"ok": sum(r.ok for r in results.values()), "failed": dict(failed),
              "states": dict(states), "total_s": round(total, 2),
              "requests": timed.requests, "chunks_sent": sum(r.sent for r in results.values()),
              "model_bytes": MODEL.stat().st_size + MANIFEST.stat().st_size,
              **_percentiles(timed.per_gateway_s())}
    return {"signed_commands": SIGNED_COMMANDS, "concurrency": CONCURRENCY,
            "ping": ping, "deploy": deploy}


def cloud(host: str, port: int, prefix: str, ids: list[str], key_path: str,
          conn: Connection) -> None:
    """Process entry: deploy to ``ids``, send the report (or the error) down ``conn``."""
    logging.basicConfig(level=logging.ERROR)
    try:
        out: dict[str, Any] = asyncio.run(run_cloud(host, port, prefix, ids, key_path))
    except Exception as exc:  # reported to the parent, which fails the run
        out = {"error": f"{type(exc).__name__}: {exc}"}
    with contextlib.suppress(OSError, BrokenPipeError):
        conn.send(out)
