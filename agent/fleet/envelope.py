"""The command envelope: who a request is for, when it is valid, and who signed it.

A request on ``{prefix}/{gateway}/cmd/{name}`` is a JSON object::

    {"id": "c-42", "args": {...}, "gateway": "gw-7",
     "issued_at": "2026-12-08T00:40:00Z", "expires_at": "2026-12-08T01:40:00Z",
     "sig": {"key": "ops-2026", "alg": "ed25519", "sig": "..."}}

Only ``id`` is always required. The checks, in order (``check`` returns the first refusal):

* ``gateway``, when present, must be this gateway's id (``wrong_gateway``).
* ``expires_at`` in the past is ``expired``; ``issued_at`` more than ``CLOCK_SKEW_S`` ahead of
  this gateway's clock is ``issued_in_future``. ``expires_at`` absent: ``issued_at`` +
  ``DEFAULT_LIFETIME_S``. A lifetime above ``MAX_LIFETIME_S`` is refused, so the table of seen
  ids only ever has to remember a bounded stretch of time.
* A command in ``STATE_CHANGING`` with ``require_signature`` on must carry ``sig``, and then also
  ``gateway``, ``issued_at`` and ``expires_at``: they are part of what is signed. A ``sig`` that
  is present is checked on every command, whatever the setting: a bad signature is never
  ignored (a cloud that signs everything learns of a gateway that trusts other keys from its
  first ping). Refusals carry the ``SignatureRefused`` reason (``unsigned``,
  ``malformed_signature``, ``unknown_key``, ``bad_signature``).

The signed body is ``{gateway, name, id, issued_at, expires_at, args}`` with the values exactly
as sent (``args`` before any defaults are filled in), in the ``cmd`` domain of
``agent.fleet.signing``; ``name`` is the command name from the topic, so a signature made for
one command does not verify for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field

from agent.fleet.signing import SignatureRefused, TrustedKeys

CLOCK_SKEW_S: Final = 300.0
DEFAULT_LIFETIME_S: Final = 3600.0
MAX_LIFETIME_S: Final = 7 * 86_400.0
# RFC 3339 with a zone (Z or an offset): a time without one would mean different instants on
# the cloud and on the gateway.
TIMESTAMP_PATTERN: Final = (r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?"
                            r"(Z|[+-]\d{2}:\d{2})$")

Timestamp = Annotated[str, Field(max_length=40, pattern=TIMESTAMP_PATTERN)]


class CommandRequest(BaseModel):
    """What the cloud sends on ``cmd/{name}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
    args: dict[str, Any] = Field(default_factory=dict)
    gateway: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    issued_at: Timestamp | None = None
    expires_at: Timestamp | None = None
    sig: Any = None  # its shape is checked by agent.fleet.signing (malformed_signature)


def parse_time(text: str, what: str) -> datetime:
    try:
        # fromisoformat takes at most 6 fraction digits: nanoseconds are cut, not refused.
        head, dot, rest = text.partition(".")
        if dot:
            digits = len(rest) - len(rest.lstrip("0123456789"))
            text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what}: {text[:40]!r} is not a valid time") from None


def signed_body(gateway: str | None, name: str, req: CommandRequest) -> dict[str, Any]:
    """The document a command's signature covers."""
    return {"gateway": gateway, "name": name, "id": req.id, "issued_at": req.issued_at,
            "expires_at": req.expires_at, "args": req.args}


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Validity:
    """When the request stops being valid (None: never, for an unsigned request without
    times), and which key signed it (None: unsigned)."""

    expires_at: datetime | None
    key_id: str | None


def check(req: CommandRequest, *, gateway: str, name: str, now: datetime,
          trusted: TrustedKeys, signature_required: bool) -> Refusal | Validity:
    if req.gateway is not None and req.gateway != gateway:
        shown = req.gateway.encode("ascii", "backslashreplace").decode()[:64]
        return Refusal("wrong_gateway", f"the command is for gateway {shown!r}, this is "
                                        f"{gateway!r}")
    try:
        issued = parse_time(req.issued_at, "issued_at") if req.issued_at else None
        expires = parse_time(req.expires_at, "expires_at") if req.expires_at else None
    except ValueError as exc:
        return Refusal("invalid_request", str(exc))
    try:
        if expires is None and issued is not None:
            expires = issued + timedelta(seconds=DEFAULT_LIFETIME_S)
    except OverflowError:  # issued in the year 9999
        return Refusal("invalid_request", "issued_at is out of range")
    if issued is not None and expires is not None and expires < issued:
        return Refusal("invalid_request", "expires_at is before issued_at")
    start = issued if issued is not None else now
    if expires is not None and (expires - start).total_seconds() > MAX_LIFETIME_S:
        return Refusal("invalid_request", f"the command is valid for longer than "
                                          f"{MAX_LIFETIME_S:g} s")
    if expires is not None and expires <= now:
        return Refusal("expired", f"the command expired at {expires.isoformat()} "
                                  f"(now {now.isoformat(timespec='seconds')})")
    if issued is not None and (issued - now).total_seconds() > CLOCK_SKEW_S:
        return Refusal("issued_in_future", f"issued_at {issued.isoformat()} is more than "
                                           f"{CLOCK_SKEW_S:g} s ahead of this gateway's clock")
    if req.sig is None and not signature_required:
        return Validity(expires, None)
    if req.sig is None:
        return Refusal("unsigned", f"{name!r} changes the gateway and must be signed by a "
                                   "trusted key")
    if req.gateway is None or req.issued_at is None or req.expires_at is None:
        return Refusal("invalid_request", "a signed command names gateway, issued_at and "
                                          "expires_at (they are part of what is signed)")
    try:
        key_id = trusted.verify("cmd", signed_body(req.gateway, name, req), req.sig)
    except SignatureRefused as exc:
        return Refusal(exc.reason, str(exc))
    except ValueError as exc:  # a configured key that is not a point of the curve
        return Refusal("unknown_key", f"a trusted key is unusable: {exc}")
    return Validity(expires, key_id)
