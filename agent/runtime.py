"""The agent: one pipeline generation per configuration, owned by one TaskGroup.

    sensors (supervised) -> readings queue -> clean -> windows -> outbox -> uplink
                                                          \\-> infer queue -> infer -> outbox

Signals: SIGTERM/SIGINT flush and exit 0; SIGHUP reloads the config file. A reload never ends
the agent: the new file is read, validated and every object of its generation built (without
hardware, ``agent.preflight``) while the running generation goes on; any failure on the way,
whatever it is, is logged with its reason, counted and kept in ``last_reload_error`` (which
`edge-agent reload` reports), and the running generation keeps going. Only then is the running
generation flushed (like a stop) and the new one started; if the new one fails before it is
running, the previous configuration is started again and the reload reported as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.clock import Clock
from agent.config.load import ConfigError, load_config
from agent.config.schema import AgentConfig
from agent.control.server import ControlServer
from agent.control.wire import ControlSocketError
from agent.fleet.config_apply import ConfigDeployer
from agent.generation import Pipeline
from agent.pipeline.infer import InferenceStage
from agent.preflight import Preflight, preflight
from agent.sdnotify import Notifier
from agent.uplink.commands import CommandResult, Handler, encode_result
from drivers.base import BuildContext

if TYPE_CHECKING:
    from agent.sparkplug.session import SparkplugSession
    from agent.web.server import WebServer

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        config_path: str | Path | None = None,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        loader: Callable[[str | Path], AgentConfig] = load_config,
        setup: Callable[[BuildContext], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.clock = clock
        self.notifier = notifier or Notifier()
        self._loader = loader
        self._setup = setup
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.pipeline: Pipeline | None = None
        self.started_mono = time.monotonic()
        self.generation = 0
        self.reloads_ok = 0
        self.reloads_rejected = 0
        self.last_reload_error = ""
        self.ready = asyncio.Event()
        self._gen_ready = asyncio.Event()
        self._reloading = False
        self.control: ControlServer | None = None
        self.infer: InferenceStage | None = None
        self.web: WebServer | None = None
        self.sparkplug: SparkplugSession | None = None
        # config.apply needs a file to replace: an agent started from a dict has none.
        self.deployer = (ConfigDeployer(Path(config_path), self, self._check_file)
                         if config_path is not None else None)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _install_signals(self) -> list[int]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        for sig, fn in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                        (signal.SIGHUP, self.request_reload)):
            try:
                loop.add_signal_handler(sig, fn)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread: the embedding code stops us instead
        return installed

    def _reject(self, reason: str, details: list[str] | None = None) -> None:
        self.reloads_rejected += 1
        self.last_reload_error = reason[:4000]  # bounded: it travels in status and health
        log.error("reload rejected, keeping the running config: %s", self.last_reload_error)
        for line in (details or [])[:50]:
            log.error("  %s", line)

    def _load_and_check(self, path: str | Path) -> tuple[AgentConfig, Preflight]:
        new = self._loader(path)
        return new, preflight(new)

    def _check_file(self, path: Path) -> tuple[AgentConfig | None, list[str]]:
        """What `config check` says of ``path``: the config and every problem (a model that
        does not load included), one line each; never raises."""
        try:
            cfg, checked = self._load_and_check(path)
        except ConfigError as exc:
            return None, [str(p) for p in exc.problems]
        except Exception as exc:  # the promise is a line per problem, not a traceback
            log.debug("checking %s failed", path, exc_info=True)
            return None, [f"cannot be checked: {type(exc).__name__}: {str(exc)[:300]}"]
        return cfg, [str(p) for p in checked.problems]

    def command_handlers(self) -> Mapping[str, Handler]:
        return self.deployer.handlers() if self.deployer is not None else {}

    def generation_ready(self) -> bool:
        return self.pipeline is not None and self._gen_ready.is_set()

    async def send_reply(self, name: str, req_id: str, ok: bool,
                         result: dict[str, Any]) -> bool:
        """A late result on ``cmd/{name}/result`` through the running generation's uplink."""
        p = self.pipeline
        if p is None or not self._gen_ready.is_set():
            return False
        from datetime import UTC, datetime

        reply = CommandResult(id=req_id, name=name, ok=ok, result=result,
                              gateway=self.cfg.gateway.id, ts=datetime.now(UTC))
        return await p.uplink.send_reply(name, encode_result(reply))

    async def _try_reload(self) -> AgentConfig | None:
        """The new config if it loads, validates and builds; None (counted, logged) if not."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: the agent was not started from a file")
            return None
        try:
            # Reading, parsing and building (model files included) off the event loop, which
            # keeps the running generation going meanwhile.
            new, checked = await asyncio.to_thread(self._load_and_check, self.config_path)
        except ConfigError as exc:
            lines = [f"{p.origin}: {p}" if p.origin else str(p) for p in exc.problems]
            self._reject("; ".join(lines), lines)
            return None
        except Exception as exc:  # whatever the file does to the loader, the agent goes on
            log.debug("reload failed", exc_info=True)
            self._reject(f"{self.config_path}: cannot be loaded: {type(exc).__name__}: "
                         f"{str(exc)[:500]}")
            return None
        if checked.errors:
            lines = [str(p) for p in checked.errors]
            self._reject("; ".join(lines), lines)
            return None
        for p in checked.warnings:  # the inference stage keeps what it has loaded
            log.warning("reload: %s", p)
        self.last_reload_error = ""
        return new

    async def run(self, *, install_signals: bool = True) -> int:
        installed = self._install_signals() if install_signals else []
        loop = asyncio.get_running_loop()
        # The control socket lives across reloads: it looks up the current pipeline per request,
        # so a technician's `tail` survives a SIGHUP.
        self.control = ControlServer(self.cfg.control.socket, self,
                                     export_dir=Path(self.cfg.outbox.path).parent)
        control_task = asyncio.create_task(self._serve_control(), name="control")
        web_task = await self._start_web()
        spb_task = self._start_sparkplug()
        deploy_task = (asyncio.create_task(self.deployer.run(), name="config-deploy")
                       if self.deployer is not None else None)
        tasks = [t for t in (control_task, web_task, spb_task, deploy_task) if t is not None]
        try:
            return await self._generations()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
            if self.infer is not None:
                self.infer.close()
            self.notifier.close()

    async def _serve_control(self) -> None:
        assert self.control is not None
        try:
            await self.control.serve()
        except (ControlSocketError, OSError) as exc:
            # The pipeline matters more than the technician's socket: run on without it.
            log.error("control socket %s unavailable: %s", self.cfg.control.socket, exc)

    def _build(self, previous: AgentConfig | None) -> Pipeline:
        """The pipeline of ``self.cfg``; on failure after a reload, that of ``previous``."""
        if self.infer is None:
            self.infer = InferenceStage()  # loaded by the pipeline; kept across reloads
        try:
            return Pipeline(self.cfg, agent=self, clock=self.clock, setup=self._setup,
                            infer=self.infer)
        except Exception as exc:
            if previous is None:
                raise
            self._reverted(previous, exc)
            return Pipeline(self.cfg, agent=self, clock=self.clock, setup=self._setup,
                            infer=self.infer)

    def _reverted(self, previous: AgentConfig, exc: BaseException) -> None:
        log.debug("the new generation failed", exc_info=exc)
        self._reloading = False
        self._reject(f"{self.config_path}: the new configuration failed to start "
                     f"({type(exc).__name__}: {str(exc)[:500]}); running the previous one again")
        self.cfg = previous

    async def _start_web(self) -> asyncio.Task[None] | None:
        """The status page and /metrics, when configured; they live across reloads (a change
        to ``[web]`` takes effect on restart). The pipeline matters more: a web server that
        cannot start is logged and the agent runs on without it."""
        if not self.cfg.web.enabled():
            return None
        # Imported here: with the page and metrics off, the agent loads none of it.
        from agent.web.server import WebConfigError, WebServer

        try:
            web = WebServer(self.cfg.web, self)
            await web.start()
        except WebConfigError as exc:
            log.error("status page and metrics off: %s", exc)
            return None
        self.web = web
        return asyncio.create_task(web.serve(), name="web")

    def _start_sparkplug(self) -> asyncio.Task[None] | None:
        """The Sparkplug edge node, when configured; like the control socket it lives across
        reloads, so bdSeq and seq run on (a change to ``[sparkplug]`` takes effect on
        restart)."""
        cfg = self.cfg.sparkplug
        if not cfg.enabled:
            return None
        from agent.sparkplug.session import SparkplugSession

        state = Path(cfg.state_dir or Path(self.cfg.outbox.path).parent)
        self.sparkplug = SparkplugSession(cfg, self.cfg.mqtt, self.cfg.gateway.id, __version__,
                                          state)
        return asyncio.create_task(self.sparkplug.run(), name="sparkplug")

    async def _generations(self) -> int:
        previous: AgentConfig | None = None  # what to go back to if a reloaded config fails
        while True:
            self.generation += 1
            self._reload.clear()
            self._gen_ready.clear()
            pipeline = self._build(previous)
            self.pipeline = pipeline
            if self.web is not None:
                self.web.attach(pipeline)
            if self.sparkplug is not None:
                pipeline.reading_listeners.append(self.sparkplug.on_reading)
            gen_task = asyncio.create_task(pipeline.run(), name=f"pipeline-{self.generation}")
            stop_w = asyncio.create_task(self._stop.wait(), name="wait-stop")
            reload_w = asyncio.create_task(self._reload.wait(), name="wait-reload")
            new_cfg: AgentConfig | None = None
            failed_start = False
            try:
                while new_cfg is None and not self._stop.is_set():
                    done, _ = await asyncio.wait({gen_task, stop_w, reload_w},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if gen_task in done:
                        exc = gen_task.exception()
                        if previous is not None and not self._gen_ready.is_set():
                            # A reloaded config that cannot start: back to the one that ran.
                            self._reverted(previous, exc or RuntimeError("ended on its own"))
                            failed_start = True
                            break
                        gen_task.result()  # a pipeline crash is a bug: let it surface
                        raise RuntimeError("pipeline ended on its own")
                    if reload_w in done:
                        self.notifier.reloading()
                        new_cfg = await self._try_reload()
                        self._reload.clear()
                        reload_w = asyncio.create_task(self._reload.wait(), name="wait-reload")
                        if new_cfg is None:
                            self.notifier.ready("reload rejected; running previous config")
            finally:
                stop_w.cancel()
                reload_w.cancel()
            if failed_start:
                self.pipeline = None
                previous = None
                continue
            if self._stop.is_set():
                self.notifier.stopping()
            await pipeline.stop(self.cfg.runtime.stop_timeout_s)
            with contextlib.suppress(asyncio.CancelledError):
                await gen_task
            if self._stop.is_set() or new_cfg is None:
                return 0
            previous = self.cfg
            self.cfg = new_cfg
            self._reloading = True  # counted as reloaded once the new generation runs

    def on_pipeline_ready(self) -> None:
        """Called by the pipeline once every stage is running."""
        self._gen_ready.set()
        if self._reloading:
            self._reloading = False
            self.reloads_ok += 1
            log.info("config reloaded from %s (generation %d)", self.config_path,
                     self.generation)
        if not self.ready.is_set():
            self.notifier.ready(f"edge-agent {__version__} running")
            self.ready.set()
        else:
            self.notifier.ready("config reloaded")

    def snapshot(self) -> dict[str, Any]:
        p = self.pipeline
        return {
            "agent": {
                "version": __version__,
                "gateway": self.cfg.gateway.id,
                "uptime_s": round(time.monotonic() - self.started_mono, 1),
                "config_file": str(self.config_path) if self.config_path else None,
                "generation": self.generation,
                "reloads_ok": self.reloads_ok,
                "reloads_rejected": self.reloads_rejected,
                "last_reload_error": self.last_reload_error,
            },
            **(p.snapshot() if p is not None else {}),
            **({"web": self.web.status()} if self.web is not None else {}),
            **({"sparkplug": self.sparkplug.status()} if self.sparkplug is not None else {}),
            **({"config_apply": self.deployer.status()} if self.deployer is not None else {}),
        }
