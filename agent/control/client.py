"""Client side of the control socket (see ``agent.control.server`` for the wire format).

Blocking and small on purpose: the CLI sends one request and prints the answer, so it needs no
event loop. Every read has a timeout; streaming commands get a heartbeat from the agent, so a
quiet stream is told apart from a dead agent.

    ControlClientError
     +-- AgentNotRunning        no socket, or a socket nobody listens on (exit code 3)
     +-- ControlAccessDenied    the socket exists but this user may not connect
     +-- ControlRequestError    the agent answered with an error (code, message)
     +-- ControlProtocolError   no answer in time, a broken or oversized answer
"""

from __future__ import annotations

import errno
import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

# The agent's socket when no config or --socket names one. The same value as the server's and
# the config's default (a test holds them together); kept here so that the CLI's socket
# commands import neither the server nor pydantic.
DEFAULT_SOCKET = "/run/edge-agent/control.sock"
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
STREAM_TIMEOUT_S = 20.0  # four missed agent heartbeats


class ControlClientError(Exception):
    pass


class AgentNotRunning(ControlClientError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"edge-agent is not running ({reason} at {path})")
        self.path = path
        self.reason = reason


class ControlAccessDenied(ControlClientError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"permission denied on {path}: only root and members of the edge-agent group may "
            "talk to the agent (sudo usermod -aG edge-agent $USER, then log in again)")
        self.path = path


class ControlRequestError(ControlClientError):
    def __init__(self, cmd: str, code: str, message: str) -> None:
        super().__init__(f"{cmd}: {message} ({code})")
        self.cmd = cmd
        self.code = code
        self.message = message


class ControlProtocolError(ControlClientError):
    pass


class ControlClient:
    def __init__(self, path: str | Path, *, timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None
        self._ids = itertools.count(1)

    def connect(self) -> ControlClient:
        if not Path(self.path).exists():
            raise AgentNotRunning(self.path, "no socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise AgentNotRunning(self.path, "no socket") from None
        except ConnectionRefusedError:
            sock.close()
            raise AgentNotRunning(self.path, "nobody listening on the stale socket") from None
        except PermissionError:
            sock.close()
            raise ControlAccessDenied(self.path) from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENOTSOCK:
                raise AgentNotRunning(self.path, "not a socket") from None
            raise ControlProtocolError(f"cannot connect to {self.path}: {exc}") from exc
        self._sock = sock
        self._file = sock.makefile("rb")
        return self

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self.connect() if self._sock is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def send(self, cmd: str, args: dict[str, Any] | None = None) -> int:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        req_id = next(self._ids)
        line = json.dumps({"id": req_id, "cmd": cmd, "args": args or {}}).encode() + b"\n"
        try:
            self._sock.sendall(line)
        except OSError as exc:
            raise ControlProtocolError(f"{cmd}: the agent closed the connection: {exc}") from exc
        return req_id

    def read(self, cmd: str, timeout_s: float | None = None) -> dict[str, Any] | None:
        """One reply line, or None when the agent closed the connection."""
        assert self._sock is not None and self._file is not None
        self._sock.settimeout(self.timeout_s if timeout_s is None else timeout_s)
        try:
            line = self._file.readline(MAX_RESPONSE_BYTES)
        except TimeoutError:
            raise ControlProtocolError(f"{cmd}: no answer from the agent within "
                                       f"{self._sock.gettimeout()} s") from None
        except OSError as exc:
            raise ControlProtocolError(f"{cmd}: connection lost: {exc}") from exc
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise ControlProtocolError(f"{cmd}: answer cut short or longer than "
                                       f"{MAX_RESPONSE_BYTES} bytes")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise ControlProtocolError(f"{cmd}: the agent sent invalid JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise ControlProtocolError(f"{cmd}: the agent sent {type(reply).__name__}, "
                                       "not an object")
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ControlRequestError(cmd, str(err.get("code", "error")),
                                      str(err.get("message", "request failed")))
        return reply

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its ``result``."""
        req_id = self.send(cmd, args)
        reply = self.read(cmd)
        if reply is None:
            raise ControlProtocolError(f"{cmd}: the agent closed the connection without answer")
        if reply.get("id") != req_id:
            raise ControlProtocolError(f"{cmd}: answer to request {reply.get('id')!r}, "
                                       f"expected {req_id}")
        return reply.get("result")

    def stream(self, cmd: str, args: dict[str, Any] | None = None,
               timeout_s: float = STREAM_TIMEOUT_S) -> Iterator[dict[str, Any]]:
        """Send one streaming request and yield its events until the agent ends the stream."""
        self.send(cmd, args)
        while True:
            reply = self.read(cmd, timeout_s)
            if reply is None:
                return
            yield reply
