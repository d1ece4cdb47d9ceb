"""A small HTTP/1.1 server on ``asyncio.start_server``: GET and HEAD only, one request per
connection, bounded everywhere.

Why not a library: the page needs a handful of GET routes and one long-lived event stream.
``aiohttp`` would add about 5 MB of wheels (multidict, yarl, frozenlist, ...) and its own
request machinery; ``http.server`` is thread-based. A listening asyncio socket costs nothing
until a client connects: no thread, no timer.

Hostile input: the request line and headers are bounded in length and count, read with a
timeout, and anything malformed gets a 400 and the connection is closed. Access: a token, when
configured, is accepted as the password of HTTP Basic (what a browser sends after its prompt)
or as a Bearer token (what Prometheus sends). It is never in a URL, so no log holds it; this
server logs no URLs or headers anyway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 4096
MAX_HEADERS = 64
HEADER_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0  # a client that stops reading for this long is dropped

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}


class BadRequest(Exception):
    """The request could not be parsed; the message says what was wrong."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Callable[[], AsyncGenerator[bytes, None]] | None = None
    """A body produced chunk by chunk (server-sent events); the connection ends with it."""


Handler = Callable[[Request], Awaitable[Response]]


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Parse one request head; raise BadRequest on anything malformed or oversized."""
    line = await _line(reader)
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("malformed request line") from None
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise BadRequest("malformed request line")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        raw = await _line(reader)
        if not raw:
            break
        name, sep, value = raw.partition(b":")
        if not sep or not name.strip():
            raise BadRequest("malformed header")
        try:
            headers[name.strip().decode("ascii").lower()] = value.strip().decode("latin-1")
        except UnicodeDecodeError:
            raise BadRequest("non-ASCII header name") from None
    else:
        raise BadRequest(f"more than {MAX_HEADERS} headers")
    path, _, query = target.partition("?")
    return Request(method, path, query, headers)


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest(f"line longer than {MAX_LINE_BYTES} bytes") from None
    except asyncio.IncompleteReadError:
        raise BadRequest("connection closed mid-request") from None
    return raw.rstrip(b"\r\n")


def authorized(req: Request, token: str | None) -> bool:
    """True when no token is configured, or the request carries it (Basic password or
    Bearer), compared in constant time."""
    if token is None:
        return True
    auth = req.headers.get("authorization", "")
    scheme, _, cred = auth.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = cred.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def head_bytes(resp: Response, *, length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Error')}",
             f"Content-Type: {resp.content_type}", "Connection: close",
             "X-Content-Type-Options: nosniff", "Referrer-Policy: no-referrer",
             "Content-Security-Policy: default-src 'self'; img-src 'self' data:"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in resp.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpServer:
    """Serves ``handler`` on (host, port) with at most ``max_clients`` connections at once."""

    def __init__(self, host: str, port: int, handler: Handler, *, token: str | None,
                 max_clients: int) -> None:
        self.host = host
        self.port = port
        self.handler = handler
        self.token = token
        self.max_clients = max_clients
        self.clients = 0
        self.requests = 0
        self.refused = 0
        self.unauthorized = 0
        self.bad_requests = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_LINE_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end every open connection (live pages included)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self.clients += 1
        try:
            if self.clients > self.max_clients:
                self.refused += 1
                # Read the head first (briefly): closing on unread bytes resets the connection
                # and the client would never see the 503.
                with contextlib.suppress(BadRequest, TimeoutError):
                    await asyncio.wait_for(read_request(reader), 1.0)
                await self._send(writer, Response(503, b"too many clients\n"), head=False)
                return
            try:
                req = await asyncio.wait_for(read_request(reader), HEADER_TIMEOUT_S)
            except (BadRequest, TimeoutError) as exc:
                self.bad_requests += 1
                log.debug("web: bad request from %s: %s", writer.get_extra_info("peername"), exc)
                await self._send(writer, Response(400, f"{exc or 'timeout'}\n".encode()),
                                 head=False)
                return
            self.requests += 1
            await self._send(writer, await self._respond(req), head=req.method == "HEAD")
        except (ConnectionError, TimeoutError):
            pass  # the client went away; nothing of the agent's is lost
        except asyncio.CancelledError:
            # Closing ends open streams by cancelling their handlers. A handler must not end
            # cancelled: asyncio's stream server (3.11) calls task.exception() on it and logs
            # the CancelledError as an error. Nothing awaits this task, so ending it is enough.
            pass
        finally:
            self.clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _respond(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"read-only: GET and HEAD only\n", headers={"Allow": "GET, HEAD"})
        if not authorized(req, self.token):
            self.unauthorized += 1
            return Response(401, b"token required\n",
                            headers={"WWW-Authenticate": 'Basic realm="edge-agent"'})
        try:
            return await self.handler(req)
        except Exception:  # a page bug must never reach the pipeline
            log.exception("web: handler failed on %s", req.path[:64])
            return Response(500, b"internal error\n")

    async def _send(self, writer: asyncio.StreamWriter, resp: Response, *, head: bool) -> None:
        if resp.stream is None:
            writer.write(head_bytes(resp, length=len(resp.body)))
            if not head:
                writer.write(resp.body)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            return
        writer.write(head_bytes(resp, length=None))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        if head:
            return
        # aclosing: a client that goes away ends the stream (and its subscription) now.
        async with contextlib.aclosing(resp.stream()) as chunks:
            async for chunk in chunks:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
