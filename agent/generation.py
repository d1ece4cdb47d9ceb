"""One generation of the pipeline: every stage of one configuration, in one TaskGroup.

Stopping is ordered so nothing accepted is lost: sensors stop first, the readings already
queued are cleaned and windowed, open windows are flushed (marked partial) and committed to the
outbox, and the uplink gets what is left of the stop budget to publish before it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from agent import gateway_commands
from agent.aio import within
from agent.clock import Clock
from agent.config.schema import AgentConfig
from agent.control.tail import TailHub
from agent.feed import messages as feed
from agent.feed.messages import Draft
from agent.feed.raw_batch import RawBatcher
from agent.feed.sharing import SharingPolicy
from agent.fleet.config_apply import MAX_APPLY_PAYLOAD_BYTES
from agent.fleet.firmware_deploy import FirmwareDeployments
from agent.fleet.model_deploy import ModelDeployments
from agent.fleet.signing import TrustedKeys
from agent.outbox.rows import Kind
from agent.outbox.store import Outbox
from agent.pipeline.alarms import AnomalyStage, channel_map
from agent.pipeline.clean import Cleaner, fuse_groups
from agent.pipeline.clocksync import ClockSync
from agent.pipeline.history import HistoryError, HistoryRecorder
from agent.pipeline.infer import InferenceStage
from agent.pipeline.windows import Windower
from agent.queues import BoundedQueue
from agent.readings import Inference, Reading, Window
from agent.sdnotify import Notifier
from agent.supervisor import SensorSupervisor
from agent.uplink.commands import CommandDispatcher, Handler
from agent.uplink.forwarder import Uplink
from agent.uplink.seen import SEEN_FILE, SeenCommands
from drivers.base import BuildContext
from drivers.registry import build_sensor


class Host(Protocol):
    """What a generation needs of the agent that runs it (``agent.runtime.Agent``)."""

    notifier: Notifier

    def snapshot(self) -> dict[str, Any]:
        """The status of the whole agent, for health messages."""
        ...

    def on_pipeline_ready(self) -> None:
        """Called once every stage of the generation runs."""
        ...

    def command_handlers(self) -> Mapping[str, Handler]:
        """Commands the agent answers across generations (``config.apply``, ...)."""
        ...

log = logging.getLogger(__name__)

READ_BATCH = 512
IDLE_WAIT_S = 0.25  # the process stage wakes at least this often (windows close on time)
WINDOW_GRACE_NS = 200_000_000  # readings stamped just before a boundary may arrive a bit late


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None: JSON has no NaN, and a snapshot has many."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _default_clock(cfg: AgentConfig) -> Clock:
    if cfg.runtime.clock == "trust":
        return ClockSync(lambda _wall_ns: True)
    return ClockSync()


class Pipeline:
    def __init__(self, cfg: AgentConfig, *, agent: Host | None = None,
                 clock: Clock | None = None,
                 setup: Callable[[BuildContext], None] | None = None,
                 infer: InferenceStage | None = None) -> None:
        self.cfg = cfg
        self.agent = agent
        self.clock: Clock = clock or _default_clock(cfg)
        self.gateway = cfg.gateway.id
        self._feed = feed
        rt = cfg.runtime
        self.readings: BoundedQueue[Reading] = BoundedQueue("readings", rt.queue_size,
                                                            "drop_oldest")
        self.windows_q: BoundedQueue[Window] = BoundedQueue("infer", 256, "drop_oldest")
        self.cleaner = Cleaner(cfg.sensors, self.clock, fuse_groups=fuse_groups(cfg.streams))
        self.windower = Windower(cfg.streams, cfg.sensors, clock=self.clock)
        self.anomalies = AnomalyStage(cfg)
        # The stage outlives a reload: a model that fails to load keeps its predecessor.
        self._owns_infer = infer is None
        self.infer = InferenceStage() if infer is None else infer
        # Deploys, activations and rollbacks choose the files; they outlive a restart.
        self.deployments = ModelDeployments(cfg, self.infer)
        self.firmware = FirmwareDeployments(cfg, lambda: self.ctx.shared if self.ctx else None)
        errors = self.infer.reload(self.deployments.configs())
        if infer is None:
            self.infer.load_errors = errors
        self.history = self._history_recorder()
        self.outbox = Outbox(cfg.outbox, self.gateway)
        self.sharing = SharingPolicy(cfg)
        self.seen = SeenCommands(Path(cfg.outbox.path).parent / SEEN_FILE)
        # config.apply carries a whole config file: the dispatcher takes requests that size.
        self.commands = CommandDispatcher(
            {**self._command_handlers(), **self._fleet_handlers()},
            trusted=TrustedKeys(cfg.commands.trusted()),
            require_signature=cfg.commands.require_signature, seen=self.seen,
            max_bytes=MAX_APPLY_PAYLOAD_BYTES)
        self.uplink = Uplink(cfg.mqtt, self.gateway, self.outbox, self.commands)
        self.supervisors: list[SensorSupervisor] = []
        self.ctx: BuildContext | None = None
        self._setup = setup
        self._sensor_tasks: list[asyncio.Task[None]] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._process_done = asyncio.Event()
        self._infer_done = asyncio.Event()
        self.heartbeat_mono = time.monotonic()
        self.windows_published = 0
        self.inferences_published = 0
        self.raw_published = 0  # raw messages put into the outbox (per topic)
        self.raw_readings = 0  # readings handed to the raw lane (per stream)
        raw = cfg.raw
        self.raw_batches = None if raw.format == "reading" else RawBatcher(
            self.gateway, self._put_raw, max_readings=raw.max_readings,
            max_bytes=min(raw.max_bytes, cfg.mqtt.max_payload_bytes),
            linger_ms=raw.linger_ms, mono_ns=self.clock.mono_ns)
        self.errors: dict[str, int] = {}
        self.last_inference: dict[str, dict[str, Any]] = {}
        self._windows_for_stream: dict[str, int] = {}
        self.raw_streams = {s.name for s in cfg.streams if s.raw}
        self.tail = TailHub()
        # Called with every published window / inference (the status page's history).
        self.reading_listeners: list[Callable[[Reading], None]] = []
        self.window_listeners: list[Callable[[Window], None]] = []
        self.inference_listeners: list[Callable[[Inference], None]] = []

    # -- stages ---------------------------------------------------------------------------

    def _history_recorder(self) -> HistoryRecorder | None:
        h = self.cfg.history
        traffic, energy, window_s = self.infer.history_streams()
        circuits = {st.name: channel_map(st.anomaly) for st in self.cfg.streams
                    if st.anomaly is not None}
        if not h.enabled or not (traffic or energy or circuits):
            return None
        return HistoryRecorder(self.cfg.history_path(), window_s=window_s,
                               traffic_streams=traffic, energy_streams=energy,
                               retention_days=h.retention_days, circuits=circuits,
                               circuit_days=h.circuit_days)

    def _open_history(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the model history; one that cannot be opened is reported, never fatal."""
        assert self.history is not None
        try:
            self.history.open()
        except HistoryError as exc:
            log.error("model history disabled: %s", exc)
            self.history = None
            return
        stack.callback(self.history.close)

    def _emit(self, r: Reading) -> None:
        self.readings.put(r)

    def _publish_window(self, w: Window) -> None:
        self._share("window", w.stream, self._feed.window_message(self.gateway, w))
        self.windows_published += 1
        self.windows_q.put(w)
        for listener in self.window_listeners:
            try:
                listener(w)
            except Exception:  # an observer's bug must not cost the window
                self._error("listener", f"a window of {w.stream}")
        try:
            for event in self.anomalies.on_window(w):
                self._share("anomaly", w.stream, self._feed.anomaly_message(self.gateway, event))
        except Exception:  # a detector bug must not cost the window
            self._error("anomaly", f"a window of {w.stream}")
        if self.tail.active:
            self.tail.publish("window", w.stream, {
                "start_ns": w.start_ns, "end_ns": w.end_ns, "flags": list(w.flags),
                "channels": {k: {"count": c.count, "mean": c.mean, "unit": c.unit}
                             for k, c in w.channels.items()},
                "derived": w.derived})

    async def _process(self) -> None:
        """Clean and window readings; close windows on wall-clock boundaries."""
        wait_s = IDLE_WAIT_S
        try:
            while True:
                batch = await self.readings.get_batch(READ_BATCH, timeout_s=wait_s)
                self.heartbeat_mono = time.monotonic()
                for r in batch:
                    try:
                        self._ingest(r)
                    except Exception:  # one odd reading must not stop the stage
                        self._error("process", f"reading {r.channel}={r.value!r}")
                wait_s = self._flush_raw()
                try:
                    for w in self.windower.close_due(self.clock.wall_ns(), WINDOW_GRACE_NS):
                        self._publish_window(w)
                except Exception:
                    self._error("window", "closing windows")
                if self._stopping.is_set() and not len(self.readings):
                    break
        finally:
            try:
                if self.raw_batches is not None:
                    try:
                        self.raw_batches.flush()
                    except Exception:
                        self._error("raw", "sealing the raw batches at stop")
                for w in self.windower.flush():
                    self._publish_window(w)
            finally:
                self._process_done.set()

    def _flush_raw(self) -> float:
        """Seal the raw batches that are due; how long the stage may wait for readings."""
        if self.raw_batches is None:
            return IDLE_WAIT_S
        try:
            due = self.raw_batches.flush_due(caught_up=not len(self.readings))
        except Exception:  # a batch that cannot be sealed must not stop the stage
            self._error("raw", "sealing a raw batch")
            return IDLE_WAIT_S
        return IDLE_WAIT_S if due is None else min(IDLE_WAIT_S, due)

    def _ingest(self, r: Reading) -> None:
        cleaned = self.cleaner.process(r)
        if cleaned is None:
            return
        self.windower.add(cleaned)
        if self.reading_listeners:
            for listener in self.reading_listeners:
                listener(cleaned)
        if self.tail.active:
            self.tail.publish("reading", cleaned.sensor, {
                "quantity": cleaned.quantity, "value": cleaned.value, "unit": cleaned.unit,
                "ts_ns": cleaned.ts_ns, "quality": cleaned.quality,
                "reasons": list(cleaned.reasons)})
        streams = self.windower.raw_streams_for(cleaned.sensor)
        if not streams:
            return
        self.raw_readings += len(streams)
        batches = self.raw_batches
        for stream in streams:
            if batches is not None:
                batches.add(stream, cleaned)
            else:
                self._put_raw(stream, self._feed.reading_message(self.gateway, stream, cleaned))

    def _put_raw(self, stream: str, draft: Draft[Any]) -> None:
        self.raw_published += self._share("raw", stream, draft)

    def _share(self, kind: Kind, stream: str, draft: Draft[Any]) -> int:
        """Put ``draft`` into the outbox on every topic the sharing policy allows."""
        routes = self.sharing.route(kind, stream, draft)
        for topic, routed in routes:
            self.outbox.put(kind, topic, routed)
        return len(routes)

    def _error(self, stage: str, what: str) -> None:
        """Count and log a bug-class failure; the first few with a traceback."""
        n = self.errors[stage] = self.errors.get(stage, 0) + 1
        if n <= 3:
            log.exception("%s stage failed on %s (%d so far)", stage, what, n)
        else:
            log.debug("%s stage failed on %s (%d so far)", stage, what, n, exc_info=True)

    async def _infer(self) -> None:
        while True:
            batch = await self.windows_q.get_batch(16, timeout_s=0.5)
            for w in batch:
                try:
                    if self.history is not None:
                        self.history.observe(w)
                    results: list[Inference] = await self.infer.on_window(w)
                    for inf in results:
                        self._publish_inference(inf)
                    if results:
                        self.deployments.after_window()
                except Exception:  # a model failure must not stop the pipeline
                    self._error("infer", f"a window of {w.stream}")
            if self._process_done.is_set() and not len(self.windows_q):
                self._infer_done.set()
                return

    def _publish_inference(self, inf: Inference) -> None:
        self._share("inference", inf.stream, self._feed.inference_message(self.gateway, inf))
        self.inferences_published += 1
        for listener in self.inference_listeners:
            try:
                listener(inf)
            except Exception:
                self._error("listener", f"an inference of {inf.model}")
        if self.tail.active:
            self.tail.publish("inference", inf.model, {
                "version": inf.version, "outputs": inf.outputs,
                "shadow": inf.shadow, "latency_ms": inf.latency_ms})
        self.last_inference[inf.model + (":shadow" if inf.shadow else "")] = {
            "version": inf.version, "outputs": inf.outputs,
            "latency_ms": inf.latency_ms, "window_start_ns": inf.window_start_ns,
        }

    async def _watch_models(self) -> None:
        """Reload the models when a model or manifest file changes on disk (a new version
        copied in); a bad new file is refused and the running version kept."""
        seen = self.infer.files()
        while True:
            await asyncio.sleep(self.cfg.runtime.model_watch_s)
            now = await asyncio.to_thread(self.infer.files)
            if now != seen:
                log.info("model files changed: reloading models")
                await asyncio.to_thread(self.infer.reload, self.deployments.configs())
                seen = await asyncio.to_thread(self.infer.files)

    async def _health(self) -> None:
        period = self.cfg.runtime.health_period_s
        while True:
            await asyncio.sleep(period)
            try:
                snap = self.agent.snapshot() if self.agent is not None else self.snapshot()
                self._share("health", "",
                            self._feed.health_message(self.gateway, json_safe(snap)))
            except Exception:  # health must never stop the pipeline
                self._error("health", "the health snapshot")

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the systemd interval, only while the pipeline makes progress."""
        notifier = self.agent.notifier if self.agent is not None else None
        if notifier is None or notifier.watchdog_s is None:
            return
        half = notifier.watchdog_s / 2
        while True:
            await asyncio.sleep(half)
            # The process stage wakes at least every 0.25 s; a stale heartbeat means it is stuck.
            if time.monotonic() - self.heartbeat_mono < max(half, 1.0):
                notifier.watchdog()
            else:
                log.error("pipeline made no progress for %.1f s: withholding the watchdog ping",
                          time.monotonic() - self.heartbeat_mono)

    # -- lifecycle ------------------------------------------------------------------------

    def _open_seen(self, stack: contextlib.AsyncExitStack) -> None:
        try:
            self.seen.open()
        except (OSError, sqlite3.Error) as exc:
            # Commands still run, de-duplicated in memory only: refusing every command would
            # leave the gateway unmanageable over a table of ids.
            log.error("%s: cannot keep command ids across restarts: %s", self.seen.path, exc)
            self.commands.seen = None
            return
        stack.callback(self.seen.close)

    async def run(self) -> None:
        rt = self.cfg.runtime
        async with contextlib.AsyncExitStack() as stack:
            self.outbox.open()
            stack.callback(self.outbox.close)
            self._open_seen(stack)
            if self.history is not None:
                self._open_history(stack)
            if self._owns_infer:
                stack.callback(self.infer.close)
            ctx = BuildContext(clock=self.clock, stack=stack)
            self.ctx = ctx  # emulators live in ctx.shared: the demo and tests reach them here
            stack.push_async_callback(self.firmware.aclose)
            if self._setup is not None:
                self._setup(ctx)  # e.g. an emulated bus prepared before any sensor is built
            async with asyncio.TaskGroup() as tg:
                for scfg in self.cfg.sensors:
                    if not scfg.enabled:
                        continue
                    sup = SensorSupervisor(
                        scfg.name, scfg.driver,
                        lambda scfg=scfg: build_sensor(scfg, ctx),  # type: ignore[misc]
                        self._emit,
                        backoff_initial_s=rt.backoff_initial_s, backoff_max_s=rt.backoff_max_s,
                        down_after=rt.down_after, open_timeout_s=max(5.0, scfg.timeout_s * 3),
                    )
                    self.supervisors.append(sup)
                    self._sensor_tasks.append(tg.create_task(sup.run(), name=f"sensor:{scfg.name}"))
                for name, coro in (("process", self._process()), ("infer", self._infer()),
                                   ("outbox", self.outbox.run()), ("uplink", self.uplink.run()),
                                   ("health", self._health()), ("watchdog", self._watchdog()),
                                   ("models", self._watch_models())):
                    self._tasks[name] = tg.create_task(coro, name=name)
                if self.agent is not None:
                    self.agent.on_pipeline_ready()
                await self._stopped.wait()
                for t in self._tasks.values():
                    t.cancel()

    async def stop(self, budget_s: float) -> None:
        """Flush everything accepted into the outbox, give the uplink the rest of the budget."""
        deadline = time.monotonic() + budget_s
        for t in self._sensor_tasks:
            t.cancel()
        if self._sensor_tasks:
            await asyncio.wait(self._sensor_tasks, timeout=max(0.1, budget_s * 0.25))
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            await within(self._process_done.wait(), max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            await within(self._infer_done.wait(),
                                   max(0.1, (deadline - time.monotonic()) * 0.5))
        self.outbox.flush()
        remaining = deadline - time.monotonic()
        if remaining > 0:
            with contextlib.suppress(Exception):
                await self.uplink.drain(remaining)
        self._stopped.set()

    # -- cloud commands and health ----------------------------------------------------------

    def _command_handlers(self) -> dict[str, Handler]:
        return gateway_commands.handlers(self.cfg, lambda: self.supervisors, self.sharing,
                                         self.activate_model)

    def _fleet_handlers(self) -> dict[str, Handler]:
        """The fleet commands: model deploys and rollbacks, and the agent's commands that
        outlive a generation (``config.apply``, ...); the dispatcher runs the state-changing
        ones only when signed (``STATE_CHANGING``)."""
        handlers = {**self.deployments.handlers(), **self.firmware.handlers()}
        if self.agent is not None:
            handlers.update(self.agent.command_handlers())
        return handlers

    def activate_model(self, name: str, force: bool) -> str:
        """Promote ``name``'s shadow candidate (refused with the scores unless it won on the
        live windows, or ``force``); returns how it scored."""
        return self.deployments.activate(name, force)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "sensors": [s.snapshot(now) for s in self.supervisors],
            "queues": {q.name: q.stats() for q in (self.readings, self.windows_q)},
            "pipeline": {
                "windows": self.windows_published,
                "inferences": self.inferences_published,
                "raw": self.raw_published,
                "raw_readings": self.raw_readings,
                "heartbeat_age_s": round(now - self.heartbeat_mono, 3),
                "errors": dict(self.errors),
            },
            "clean": {**self.cleaner.stats(),
                      "stale": self.cleaner.stale(self.clock.mono_ns())},
            "windows": self.windower.stats(),
            "clock": {"synced": self.clock.synced(), "source": self.cfg.runtime.clock},
            "outbox": self.outbox.stats(),
            "sharing": self.sharing.stats(),
            "uplink": self.uplink.status(),
            "models": {"status": self.infer.status(), "last": self.last_inference,
                       "deployments": self.deployments.status(),
                       "history": self.history.status() if self.history else None},
            "anomalies": self.anomalies.status(),
            "firmware": self.firmware.status(),
        }
