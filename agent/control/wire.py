"""The control socket's wire side: what the server needs of the agent, its errors, one
client connection and the encoding of a line (see ``agent.control.server``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from agent.aio import within
from agent.control.tail import TailHub

WRITE_TIMEOUT_S = 30.0  # a client that stops reading for this long is dropped


# -- what the server needs from the agent ---------------------------------------------------

class OutboxLike(Protocol):
    def stats(self) -> Mapping[str, Any]: ...

    def export(self, path: str) -> int | Awaitable[int]:
        """Write every stored message to the new file ``path``; return the number of rows.

        A plain function is called on a worker thread, a coroutine function is awaited: either
        way a long export never stalls the event loop."""
        ...


class PipelineLike(Protocol):
    @property
    def tail(self) -> TailHub: ...

    @property
    def outbox(self) -> OutboxLike: ...

    def activate_model(self, name: str, force: bool) -> str:
        """Promote the shadow candidate; ``ValueError`` with the reason when refused."""
        ...


class AgentLike(Protocol):
    def snapshot(self) -> dict[str, Any]: ...

    def request_reload(self) -> None: ...

    @property
    def pipeline(self) -> PipelineLike | None: ...



class ControlSocketError(Exception):
    """The socket cannot be set up (path in use by a live agent, not a socket, too long)."""


class CommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in exc.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "request"
        msg = "unknown key" if e["type"] == "extra_forbidden" else str(e["msg"])
        parts.append(f"{prefix}{where}: {msg}")
    return "; ".join(parts)


def _json_default(obj: object) -> object:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode() + b"\n"


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since: float | None = time.monotonic()  # None while a request is served

    async def send(self, obj: Mapping[str, Any]) -> None:
        self.writer.write(encode(obj))
        await within(self.writer.drain(), WRITE_TIMEOUT_S)
