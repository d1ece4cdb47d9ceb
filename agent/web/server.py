"""The status page and ``/metrics`` of the running agent, on ``agent.web.http``.

Routes::

    /                 the page (page on)            /static/<file>  its script, style, icon
    /api/status       snapshot + last hour (JSON)   /events         live updates (SSE)
    /metrics          Prometheus / OpenMetrics text (metrics on)

Idle cost: with nobody connected nothing runs but a listening socket, a few appends per closed
window into the bounded history, and a logging handler for warnings. A watching page holds one
tail subscription; its updates are coalesced to at most one event a second (latest value per
channel), so a fast sensor costs the page nothing more than a slow one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from agent.config.base import is_loopback
from agent.config.services import WebConfig
from agent.control.tail import TailHub
from agent.readings import Inference, Window
from agent.web import metrics
from agent.web.history import History, WarningLog
from agent.web.http import HttpServer, Request, Response, json_bytes

log = logging.getLogger(__name__)

UPDATE_EVERY_S = 1.0
STATUS_EVERY_S = 5.0
TAIL_BATCH = 1024
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


class WebConfigError(Exception):
    """The web server cannot start as configured (token file, address in use)."""


class PipelineLike(Protocol):
    @property
    def tail(self) -> TailHub: ...

    window_listeners: list[Callable[[Window], None]]
    inference_listeners: list[Callable[[Inference], None]]

    @property
    def infer(self) -> Any: ...


class AgentLike(Protocol):
    def snapshot(self) -> dict[str, Any]: ...

    @property
    def pipeline(self) -> Any: ...


def read_token(path: str) -> str | None:
    """The first line of ``path``; None when no file is configured."""
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WebConfigError(f"web.token_file: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WebConfigError(f"web.token_file: {path}: unreadable ({type(exc).__name__})") from None
    token = text.splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise WebConfigError(f"web.token_file: {path}: the token must be at least 16 characters")
    return token


def json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def summary(snap: dict[str, Any]) -> dict[str, Any]:
    """The part of a snapshot the page's panels show (the live status event)."""
    ob: dict[str, Any] = snap.get("outbox") or {}
    up: dict[str, Any] = snap.get("uplink") or {}
    models = ((snap.get("models") or {}).get("status") or {}).get("models") or {}
    out: dict[str, Any] = json_safe({
        "agent": snap.get("agent", {}),
        "sensors": [{k: s.get(k) for k in ("name", "driver", "state", "readings", "failures",
                                            "last_error", "last_reading_age_s", "last_values")}
                    for s in snap.get("sensors") or []],
        "outbox": {k: ob.get(k) for k in ("rows", "bytes", "oldest_age_s", "depth", "drops",
                                          "quarantine_rows")},
        "uplink": {k: up.get(k) for k in ("state", "broker", "puback_latency_ms", "reconnects",
                                          "connected_for_s", "last_error", "acked", "published")},
        "models": {name: {"version": m.get("version"), "stream": m.get("stream"),
                          "last_outputs": m.get("last_outputs"),
                          "latency_ms": m.get("last_latency_ms"),
                          "source": (m.get("guard") or {}).get("source"),
                          "skill": (m.get("guard") or {}).get("skill"),
                          "out_of_range": m.get("out_of_range"),
                          "window_start_ns": m.get("last_window_start_ns"),
                          "window_s": m.get("window_s"),
                          "forecast_output": m.get("forecast_output"),
                          "last_actual": m.get("last_actual")}
                   for name, m in models.items()},
        "clock": snap.get("clock"),
    })
    return out


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + json_bytes(json_safe(data)) + b"\n\n"


class WebServer:
    def __init__(self, cfg: WebConfig, agent: AgentLike) -> None:
        self.cfg = cfg
        self.agent = agent
        self.token = read_token(cfg.token_file)
        if not is_loopback(cfg.bind) and self.token is None:
            raise WebConfigError(f"web.bind: {cfg.bind} is not loopback: set web.token_file")
        self.history = History(self._status_sample) if cfg.page else None
        self._warnings = WarningLog(self.history) if self.history is not None else None
        self.http = HttpServer(cfg.bind, cfg.port, self._handle, token=self.token,
                               max_clients=cfg.max_clients)
        self.watchers = 0
        self._attached: Any = None

    @property
    def port(self) -> int:
        return self.http.port

    def status(self) -> dict[str, Any]:
        host = self.cfg.bind if ":" not in self.cfg.bind else f"[{self.cfg.bind}]"
        return {"page": self.cfg.page, "metrics": self.cfg.metrics,
                "url": f"http://{host}:{self.port}/", "token": self.token is not None,
                "watchers": self.watchers, "requests": self.http.requests,
                "unauthorized": self.http.unauthorized, "bad_requests": self.http.bad_requests,
                "refused": self.http.refused}

    # -- the agent side -------------------------------------------------------------------

    def attach(self, pipeline: PipelineLike) -> None:
        """Feed the history from a new pipeline generation (called on start and reload)."""
        if self.history is None:
            return
        history = self.history
        pipeline.window_listeners.append(history.on_window)

        def on_inference(inf: Inference) -> None:
            models = pipeline.infer.status().get("models", {})
            history.on_inference(inf, models.get(inf.model))

        pipeline.inference_listeners.append(on_inference)
        self._attached = pipeline

    def _status_sample(self) -> tuple[int | None, str | None]:
        p = self._attached
        if p is None:
            return None, None
        return p.outbox.stats().get("rows"), p.uplink.status().get("state")

    async def start(self) -> None:
        """Listen; raise WebConfigError when the address cannot be had."""
        try:
            await self.http.start()
        except OSError as exc:
            raise WebConfigError(f"web: cannot listen on {self.cfg.bind}:{self.cfg.port}: "
                                 f"{os.strerror(exc.errno) if exc.errno else exc}") from None
        if self._warnings is not None:
            logging.getLogger().addHandler(self._warnings)
        log.info("web: listening on %s:%d (page %s, metrics %s)", self.cfg.bind, self.port,
                 "on" if self.cfg.page else "off", "on" if self.cfg.metrics else "off")

    async def serve(self) -> None:
        """Serve (after ``start``) until cancelled, then close every connection."""
        try:
            await asyncio.Event().wait()
        finally:
            if self._warnings is not None:
                logging.getLogger().removeHandler(self._warnings)
            await self.http.close()

    # -- routes ---------------------------------------------------------------------------

    async def _handle(self, req: Request) -> Response:
        if req.path == "/metrics" and self.cfg.metrics:
            return self._metrics(req)
        if not self.cfg.page:
            return Response(404, b"not found\n")
        if req.path in ("/", "/index.html"):
            return _static("index.html")
        if req.path.startswith("/static/"):
            return _static(req.path.removeprefix("/static/"))
        if req.path == "/api/status":
            assert self.history is not None
            body = {"summary": summary(self.agent.snapshot()), "history": self.history.view(),
                    "now": time.time()}
            return Response(body=json_bytes(json_safe(body)),
                            content_type="application/json",
                            headers={"Cache-Control": "no-store"})
        if req.path == "/events":
            return Response(content_type="text/event-stream",
                            headers={"Cache-Control": "no-store"}, stream=self._events)
        return Response(404, b"not found\n")

    def _metrics(self, req: Request) -> Response:
        om = metrics.wants_openmetrics(req.headers.get("accept", ""))
        fams = metrics.families(self.agent.snapshot())
        return Response(body=metrics.render(fams, openmetrics=om),
                        content_type=metrics.OPENMETRICS_TYPE if om else metrics.PROMETHEUS_TYPE)

    def _status(self) -> dict[str, Any]:
        status = summary(self.agent.snapshot())
        if self.history is not None:
            status["warnings"] = list(self.history.warnings)[-20:]
        return status

    async def _events(self) -> AsyncGenerator[bytes, None]:
        """Live updates: ``update`` (latest reading per channel, closed windows, inferences)
        at most once a second, ``status`` (the panels) every few seconds."""
        self.watchers += 1
        hub: TailHub | None = None
        sub = -1
        try:
            yield b"retry: 3000\n\n" + sse("status", self._status())
            last_status = time.monotonic()
            while True:
                pipeline = self.agent.pipeline
                tail = pipeline.tail if pipeline is not None else None
                if tail is not hub:  # a reload brought a new pipeline: follow it
                    if hub is not None:
                        hub.unsubscribe(sub)
                    hub = tail
                    if hub is not None:
                        sub, queue = hub.subscribe()
                if hub is None:
                    await asyncio.sleep(UPDATE_EVERY_S)
                    continue
                items = await queue.get_batch(TAIL_BATCH, timeout_s=STATUS_EVERY_S)
                items += queue.drain()
                update = _coalesce(items)
                if update:
                    yield sse("update", update)
                if time.monotonic() - last_status >= STATUS_EVERY_S:
                    last_status = time.monotonic()
                    yield sse("status", self._status())
                # Pace the stream: whatever arrives meanwhile is coalesced into the next event.
                await asyncio.sleep(UPDATE_EVERY_S)
        finally:
            self.watchers -= 1
            if hub is not None:
                hub.unsubscribe(sub)


def _coalesce(items: list[dict[str, Any]]) -> dict[str, Any]:
    readings: dict[str, list[Any]] = {}
    windows: list[dict[str, Any]] = []
    inferences: list[dict[str, Any]] = []
    for it in items:
        kind = it.get("kind")
        if kind == "reading":
            readings[f"{it['name']}.{it['quantity']}"] = [
                it["ts_ns"] / 1e9, it["value"], it["unit"], it["quality"]]
        elif kind == "window":
            windows.append({k: v for k, v in it.items() if k != "kind"})
        elif kind == "inference":
            inferences.append({k: v for k, v in it.items() if k != "kind"})
    out: dict[str, Any] = {}
    if readings:
        out["readings"] = readings
    if windows:
        out["windows"] = windows
    if inferences:
        out["inferences"] = inferences
    return out


def _static(name: str) -> Response:
    suffix = Path(name).suffix
    if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        return Response(404, b"not found\n")
    try:
        body = resources.files("agent.web").joinpath("static", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return Response(404, b"not found\n")
    return Response(body=body, content_type=STATIC_TYPES[suffix],
                    headers={"Cache-Control": "no-cache"})

