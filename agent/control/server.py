"""The local control socket: newline-delimited JSON between the running agent and its CLI.

One JSON object per line, UTF-8, in both directions::

    request   {"id": 7, "cmd": "status", "args": {}}
    reply     {"id": 7, "ok": true, "result": {...}}
    error     {"id": 7, "ok": false, "error": {"code": "bad_request", "message": "..."}}
    stream    {"id": 7, "ok": true, "event": "item", ...}     (tail, outbox.export)

Commands: ``status``, ``reload``, ``sensors.list``, ``outbox.stats``, ``outbox.export`` and
``tail``. A connection may carry any number of requests; ``tail`` and ``outbox.export`` stream
until they end (or the client goes away) and then close the connection.

Access control is the file mode: the socket is ``0660`` and belongs to the ``edge-agent`` group
when that group exists, so only root, the agent's user and members of the group can connect.
A bad request gets an error reply naming what was wrong; it never stops the server. A request
line longer than the bound gets an error and its connection is closed, because the rest of the
line cannot be told apart from the next request.

Connections are bounded (``max_clients``), and idle ones cannot hold the bound against
others: a connection that sends nothing for ``idle_timeout_s`` is closed, and when a new one
arrives at the bound, the connection idle the longest (waiting for a request, not streaming)
is closed to make room. Only streams (``tail``, ``outbox.export``) can fill the bound.

The agent creates the socket's own directory if it is missing (mode 0750), never the
directories above it: a mistyped path must not make a root process build a tree.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import hashlib
import inspect
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.aio import within
from agent.control.requests import ARGS, Args, ModelActivateArgs, Request, SensorsArgs, TailArgs
from agent.control.tail import TailHub
from agent.control.wire import (
    WRITE_TIMEOUT_S,
    AgentLike,
    Client,
    CommandError,
    ControlSocketError,
    PipelineLike,
    describe,
    encode,
)
from agent.jsontext import JsonRefused
from agent.jsontext import parse as parse_json
from agent.queues import BoundedQueue

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/edge-agent/control.sock"
DEFAULT_GROUP = "edge-agent"
SOCKET_MODE = 0o660
MAX_REQUEST_BYTES = 64 * 1024
MAX_CLIENTS = 16
IDLE_TIMEOUT_S = 60.0  # a connection that sends nothing for this long is closed
STREAM_HEARTBEAT_S = 5.0  # lets a streaming client tell a quiet agent from a dead one
EXPORT_CHUNK_BYTES = 48 * 1024  # 64 KiB once base64-encoded
TAIL_BATCH = 256
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL



# Top-level sections of ``status``; a snapshot taken between two pipeline generations lacks
# the pipeline's, and a reply always carries all of them.
STATUS_SECTIONS: dict[str, Callable[[], Any]] = {
    "sensors": list, "queues": dict, "pipeline": dict, "clean": dict,
    "clock": lambda: {"synced": None}, "outbox": dict, "uplink": dict, "models": dict,
}


Handler = Callable[[Request, Args, Client], Awaitable[bool]]


class ControlServer:
    """Serve the control socket at ``path`` for ``agent`` until cancelled.

    ``await serve()`` binds (replacing a stale socket left by a killed agent), sets the mode and
    group, sets ``listening`` and serves; on cancellation it closes every connection and removes
    the socket file it created. ``export_dir`` is where ``outbox.export`` stages its file before
    streaming it to the client (the agent's state directory on a gateway).
    """

    def __init__(
        self,
        path: str | Path,
        agent: AgentLike,
        *,
        group: str | None = DEFAULT_GROUP,
        export_dir: str | Path | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_clients: int = MAX_CLIENTS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self.agent = agent
        self.group = group
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.max_request_bytes = max_request_bytes
        self.max_clients = max_clients
        self.idle_timeout_s = idle_timeout_s
        self.evicted = 0
        self.listening = asyncio.Event()
        self.requests = 0
        self.errors = 0
        self._clients: dict[asyncio.Task[Any], Client] = {}
        self._handlers: dict[str, Handler] = {
            "status": self._status, "reload": self._reload, "sensors.list": self._sensors,
            "outbox.stats": self._outbox_stats, "outbox.export": self._outbox_export,
            "tail": self._tail, "model.activate": self._model_activate,
        }

    # -- lifecycle ----------------------------------------------------------------------

    async def serve(self) -> None:
        await self._clear_stale()
        server = await asyncio.start_unix_server(self._connection, path=str(self.path),
                                                 limit=self.max_request_bytes)
        inode = os.stat(self.path).st_ino
        try:
            self._set_access()
            self.listening.set()
            log.info("control socket listening on %s", self.path)
            await server.serve_forever()
        finally:
            self.listening.clear()
            server.close()
            clients = list(self._clients)
            for task in clients:
                task.cancel()
            if clients:
                await asyncio.wait(clients, timeout=2.0)
            self._remove_socket(inode)

    async def _clear_stale(self) -> None:
        path = self.path
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise ControlSocketError(f"control socket path {path} is longer than "
                                     f"{SUN_PATH_MAX} bytes")
        if not path.parent.is_dir():
            if not path.parent.parent.is_dir():
                raise ControlSocketError(f"cannot create {path.parent}: {path.parent.parent} "
                                         "is not a directory; create it or choose another "
                                         "control.socket")
            try:
                path.parent.mkdir(mode=0o750)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ControlSocketError(f"cannot create {path.parent}: "
                                         f"{exc.strerror or exc}") from exc
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            await within(asyncio.get_running_loop().sock_connect(probe, str(path)), 1.0)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        except (OSError, TimeoutError) as exc:
            raise ControlSocketError(f"cannot probe existing socket {path}: {exc}") from exc
        finally:
            probe.close()
        raise ControlSocketError(f"another agent is already listening on {path}")

    def _set_access(self) -> None:
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                gid = None  # no such group on this machine (a developer box, a test)
            if gid is not None:
                try:
                    os.chown(self.path, -1, gid)
                except PermissionError as exc:
                    log.warning("cannot give %s to group %s: %s", self.path, self.group, exc)
        os.chmod(self.path, SOCKET_MODE)

    def _remove_socket(self, inode: int) -> None:
        # Only our own file: a new agent may already have bound the same path.
        try:
            if os.stat(self.path).st_ino == inode:
                self.path.unlink()
        except FileNotFoundError:
            pass

    # -- connections --------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        client = Client(reader, writer)
        task = asyncio.current_task()
        try:
            if len(self._clients) >= self.max_clients:
                self._evict_idle()
            if task is None or len(self._clients) >= self.max_clients:
                await self._error(client, None, "busy",
                                  f"too many control connections (limit {self.max_clients})")
                return
            self._clients[task] = client
            while True:
                client.idle_since = time.monotonic()
                try:
                    line = await within(reader.readline(), self.idle_timeout_s)
                except ValueError:
                    await self._error(client, None, "too_large",
                                      f"request longer than {self.max_request_bytes} bytes; "
                                      "closing the connection")
                    return
                if not line:
                    return
                client.idle_since = None
                if line.strip() and not await self._dispatch(line, client):
                    return
        except (ConnectionError, TimeoutError) as exc:
            log.debug("control client dropped: %r", exc)
        except Exception:
            log.exception("control connection failed")
        finally:
            if task is not None:
                self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await within(writer.wait_closed(), 1.0)

    def _evict_idle(self) -> None:
        """Close the connection idle the longest, to make room for a new one."""
        idle = [(c.idle_since, t) for t, c in self._clients.items() if c.idle_since is not None]
        if not idle:
            return
        since, task = min(idle, key=lambda x: x[0])
        # Closing the transport ends its readline with EOF: the handler returns on its own.
        self._clients.pop(task).writer.close()
        self.evicted += 1
        log.info("control socket full (%d connections): closed one idle for %.1f s",
                 self.max_clients, time.monotonic() - since)

    async def _error(self, client: Client, req_id: object, code: str, message: str) -> None:
        self.errors += 1
        log.debug("control request %r refused: %s: %s", req_id, code, message)
        await client.send({"id": req_id, "ok": False, "error": {"code": code, "message": message}})

    async def _dispatch(self, line: bytes, client: Client) -> bool:
        """Answer one request; False when the connection should close afterwards."""
        self.requests += 1
        try:
            # Bounded depth and numbers: a line of 10,000 "[" must cost one error reply, not a
            # RecursionError and the connection.
            raw = parse_json(line, max_bytes=self.max_request_bytes + 2)
        except JsonRefused as exc:
            await self._error(client, None, "bad_request", f"request is not valid JSON: {exc}")
            return True
        req_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(req_id, (int, str)) or isinstance(req_id, bool):
            req_id = None
        if not isinstance(raw, dict):
            await self._error(client, req_id, "bad_request",
                              f"request must be a JSON object, got {type(raw).__name__}")
            return True
        try:
            req = Request.model_validate(raw)
        except ValidationError as exc:
            await self._error(client, req_id, "bad_request", describe(exc))
            return True
        try:
            args = ARGS[req.cmd].model_validate(req.args)
        except ValidationError as exc:
            await self._error(client, req.id, "bad_request",
                              f"{req.cmd}: {describe(exc, 'args.')}")
            return True
        try:
            return await self._handlers[req.cmd](req, args, client)
        except CommandError as exc:
            await self._error(client, req.id, exc.code, exc.message)
            return True
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("control command %s failed", req.cmd)
            await self._error(client, req.id, "failed", f"{req.cmd} failed: "
                              f"{type(exc).__name__}: {exc}")
            return True

    # -- commands -----------------------------------------------------------------------

    def _pipeline(self) -> PipelineLike:
        pipeline = self.agent.pipeline
        if pipeline is None:
            raise CommandError("unavailable", "the pipeline is not running (starting or reloading)")
        return pipeline

    def status(self) -> dict[str, Any]:
        snap = dict(self.agent.snapshot())
        for name, empty in STATUS_SECTIONS.items():
            if name not in snap:
                snap[name] = empty()
        return snap

    async def _status(self, req: Request, args: Args, client: Client) -> bool:
        await client.send({"id": req.id, "ok": True, "result": self.status()})
        return True

    async def _reload(self, req: Request, args: Args, client: Client) -> bool:
        try:
            before = self.agent.snapshot().get("agent", {})
        except Exception:  # the counters are a courtesy; the reload itself must still happen
            log.exception("snapshot before reload failed")
            before = {}
        self.agent.request_reload()
        await client.send({"id": req.id, "ok": True, "result": {
            "requested": True,
            "generation": before.get("generation"),
            "reloads_ok": before.get("reloads_ok"),
            "reloads_rejected": before.get("reloads_rejected"),
        }})
        return True

    async def _sensors(self, req: Request, args: Args, client: Client) -> bool:
        assert isinstance(args, SensorsArgs)
        sensors = [s for s in self.agent.snapshot().get("sensors", [])
                   if args.name is None or s.get("name") == args.name]
        if args.name is not None and not sensors:
            raise CommandError("not_found", f"no sensor named {args.name!r}")
        await client.send({"id": req.id, "ok": True, "result": {"sensors": sensors}})
        return True

    async def _model_activate(self, req: Request, args: Args, client: Client) -> bool:
        assert isinstance(args, ModelActivateArgs)
        try:
            reason = self._pipeline().activate_model(args.name, args.force)
        except (KeyError, ValueError) as exc:
            raise CommandError("refused", str(exc.args[0] if exc.args else exc)) from None
        await client.send({"id": req.id, "ok": True,
                           "result": {"activated": args.name, "force": args.force,
                                      "reason": reason}})
        return True

    async def _outbox_stats(self, req: Request, args: Args, client: Client) -> bool:
        stats = dict(self._pipeline().outbox.stats())
        await client.send({"id": req.id, "ok": True, "result": stats})
        return True

    async def _outbox_export(self, req: Request, args: Args, client: Client) -> bool:
        """Export into a staging file the agent can write, then stream it to the client.

        The agent's sandbox cannot write where a technician stands, so the file crosses the
        socket and the CLI writes it; ``working`` events keep the client's read timeout alive
        while a large outbox is being exported."""
        outbox = self._pipeline().outbox
        staging = Path(tempfile.mkdtemp(prefix="outbox-export-", dir=self.export_dir))
        try:
            target = staging / "outbox.jsonl"
            started = time.monotonic()
            job = asyncio.ensure_future(_run_export(outbox.export, str(target)))
            try:
                while True:
                    done, _ = await asyncio.wait({job}, timeout=STREAM_HEARTBEAT_S)
                    if done:
                        break
                    await client.send({"id": req.id, "ok": True, "event": "working",
                                       "elapsed_s": round(time.monotonic() - started, 1)})
            finally:
                if not job.done():
                    job.cancel()
            rows = job.result()
            size = target.stat().st_size if target.exists() else 0
            await client.send({"id": req.id, "ok": True, "event": "begin", "rows": rows,
                               "bytes": size})
            digest = hashlib.sha256()
            if size:
                with target.open("rb") as fh:
                    while chunk := fh.read(EXPORT_CHUNK_BYTES):
                        digest.update(chunk)
                        await client.send({"id": req.id, "ok": True, "event": "chunk",
                                           "data": base64.b64encode(chunk).decode("ascii")})
            await client.send({"id": req.id, "ok": True, "event": "end", "rows": rows,
                               "bytes": size, "sha256": digest.hexdigest()})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return False

    async def _tail(self, req: Request, args: Args, client: Client) -> bool:
        """Stream live items until the client disconnects; follows pipeline reloads."""
        assert isinstance(args, TailArgs)

        async def until_eof() -> None:
            while await client.reader.read(4096):
                pass  # a tailing client has nothing more to say; anything it sends is ignored

        eof = asyncio.create_task(until_eof(), name=f"control-tail-eof-{req.id}")
        hub: TailHub | None = None
        queue: BoundedQueue[dict[str, Any]] | None = None
        sub_id = 0
        dropped = 0
        last_sent = time.monotonic()
        try:
            await client.send({"id": req.id, "ok": True, "event": "subscribed",
                               "match": args.match})
            while not eof.done():
                pipeline = self.agent.pipeline
                current = pipeline.tail if pipeline is not None else None
                if current is not hub:
                    if hub is not None:
                        hub.unsubscribe(sub_id)
                    hub = current
                    queue = None
                    if hub is not None:
                        sub_id, queue = hub.subscribe(args.match)
                        dropped = 0
                if hub is None or queue is None:
                    await asyncio.wait({eof}, timeout=1.0)
                    continue
                getter = asyncio.create_task(queue.get_batch(TAIL_BATCH, timeout_s=1.0),
                                             name=f"control-tail-get-{req.id}")
                done, _ = await asyncio.wait({getter, eof}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                items = getter.result()
                if queue.dropped > dropped:
                    await client.send({"id": req.id, "ok": True, "event": "dropped",
                                       "count": queue.dropped - dropped})
                    dropped = queue.dropped
                for item in items:
                    client.writer.write(encode({"id": req.id, "ok": True, "event": "item",
                                                "item": item}))
                if items:
                    await within(client.writer.drain(), WRITE_TIMEOUT_S)
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= STREAM_HEARTBEAT_S:
                    await client.send({"id": req.id, "ok": True, "event": "heartbeat"})
                    last_sent = time.monotonic()
        finally:
            eof.cancel()
            if hub is not None:
                hub.unsubscribe(sub_id)
        return False



async def _run_export(export: Callable[[str], int | Awaitable[int]], path: str) -> int:
    if inspect.iscoroutinefunction(export):
        result = await export(path)
    else:
        result = await asyncio.to_thread(export, path)
        if inspect.isawaitable(result):
            result = await result
    return int(result)
