"""The cloud side of fleet commands: build signed envelopes, publish them, collect the replies.

``edge-agent fleet`` is a thin shell over this module; tests and the fleet bench import it.
``send`` publishes one command to each gateway (each gets its own envelope: the signature names
the gateway, so it cannot be replayed on another), subscribed to the result topics first so no
reply is missed, and waits at most ``timeout_s`` for them. A gateway that does not answer in
time is reported as missing, never waited on forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from agent.fleet.envelope import DEFAULT_LIFETIME_S, MAX_LIFETIME_S, CommandRequest, signed_body
from agent.fleet.signing import Domain, SigningKey
from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json

MAX_GATEWAYS: Final = 100_000
MAX_RESULT_BYTES: Final = 256 * 1024
PUBLISH_BATCH: Final = 64


def timestamp(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_id() -> str:
    return f"c-{secrets.token_hex(8)}"


def command(name: str, args: Mapping[str, Any], *, gateway: str,
            key: SigningKey | None = None, req_id: str | None = None,
            lifetime_s: float = DEFAULT_LIFETIME_S, now: datetime | None = None,
            ) -> dict[str, Any]:
    """One request for one gateway, signed when ``key`` is given."""
    if not 0 < lifetime_s <= MAX_LIFETIME_S:
        raise ValueError(f"lifetime must be in (0, {MAX_LIFETIME_S:g}] s")
    issued = now or datetime.now(UTC)
    env: dict[str, Any] = {
        "id": req_id or new_id(), "args": dict(args), "gateway": gateway,
        "issued_at": timestamp(issued),
        "expires_at": timestamp(issued + timedelta(seconds=lifetime_s)),
    }
    req = CommandRequest.model_validate(env)  # what the gateway will check, checked here first
    if key is not None:
        env["sig"] = key.sign("cmd", signed_body(gateway, name, req))
    return env


def sign_document(key: SigningKey, domain: Domain, body: Mapping[str, Any]) -> dict[str, Any]:
    """An artifact document (model manifest, firmware, config) with its signature beside it."""
    return {"body": dict(body), "sig": key.sign(domain, body)}


class SendFailed(Exception):
    """The broker could not be reached, or the connection to it broke."""


@dataclass(frozen=True)
class Broker:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


@dataclass
class Outcome:
    """What came back: the reply per gateway, and the gateways that did not answer in time."""

    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    invalid: int = 0  # replies that were not JSON objects (counted, not shown)

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.sent) - set(self.results))

    def as_json(self) -> dict[str, Any]:
        ok = sum(1 for r in self.results.values() if r.get("ok") is True)
        return {"sent": len(self.sent), "answered": len(self.results), "ok": ok,
                "failed": len(self.results) - ok, "missing": self.missing,
                "invalid_replies": self.invalid, "results": self.results}


async def send(broker: Broker, prefix: str, gateways: Sequence[str], name: str,
               args: Mapping[str, Any], *, key: SigningKey | None = None,
               timeout_s: float = 30.0, lifetime_s: float = DEFAULT_LIFETIME_S,
               client_id: str | None = None) -> Outcome:
    """Publish ``name`` to every gateway (QoS 1) and collect the replies for ``timeout_s``."""
    import aiomqtt

    if not gateways or len(gateways) > MAX_GATEWAYS:
        raise ValueError(f"give 1 to {MAX_GATEWAYS} gateways")
    out = Outcome()
    by_id: dict[str, str] = {}
    for gw in dict.fromkeys(gateways):
        env = command(name, args, gateway=gw, key=key, lifetime_s=lifetime_s)
        out.sent[gw] = env
        by_id[env["id"]] = gw
    try:
        async with aiomqtt.Client(broker.host, broker.port, username=broker.username,
                                  password=broker.password, tls_context=broker.tls,
                                  identifier=client_id or f"fleet-{secrets.token_hex(4)}",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await _exchange(client, out, by_id, prefix=prefix, name=name, timeout_s=timeout_s)
    except aiomqtt.MqttError as exc:
        raise SendFailed(f"{broker.host}:{broker.port}: {exc}") from None
    return out


async def _exchange(client: Any, out: Outcome, by_id: Mapping[str, str], *, prefix: str,
                    name: str, timeout_s: float) -> None:
    if len(out.sent) <= 16:
        for gw in out.sent:
            await client.subscribe(f"{prefix}/{gw}/cmd/{name}/result", qos=1)
    else:  # one filter instead of thousands of SUBSCRIBEs; replies of others are ignored
        await client.subscribe(f"{prefix}/+/cmd/{name}/result", qos=1)
    # A few PUBACKs awaited at once: a thousand gateways are not a thousand round trips.
    envs = list(out.sent.items())
    for i in range(0, len(envs), PUBLISH_BATCH):
        await asyncio.gather(*(client.publish(f"{prefix}/{gw}/cmd/{name}", json.dumps(env), qos=1)
                               for gw, env in envs[i:i + PUBLISH_BATCH]))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            async for msg in client.messages:
                _collect(out, by_id, msg.topic.value, msg.payload)
                if len(out.results) == len(out.sent):
                    return


def _collect(out: Outcome, by_id: Mapping[str, str], topic: str, payload: Any) -> None:
    if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_RESULT_BYTES:
        out.invalid += 1
        return
    try:
        body = parse_json(bytes(payload), max_bytes=MAX_RESULT_BYTES)
    except JsonRefused:
        out.invalid += 1
        return
    if not isinstance(body, dict):
        out.invalid += 1
        return
    gw = by_id.get(str(body.get("id")))
    # A reply counts only from the gateway it was sent to, on that gateway's topic.
    if gw is not None and topic.split("/")[-4:-3] == [gw] and body.get("gateway") == gw:
        out.results[gw] = body
