"""``edge-agent demo``: the whole pipeline on emulated devices, watched as the cloud sees it.

It starts an embedded broker on a free loopback port (or uses ``--broker``), runs the agent with
the packaged demo config, subscribes to the agent's own feed and prints what arrives, live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agent.aio import within
from agent.config.load import parse_config
from agent.config.schema import AgentConfig
from agent.control import discovery

SUBSCRIBE_TIMEOUT_S = 10.0


def demo_config_text() -> str:
    return resources.files("agent").joinpath("examples/demo.toml").read_text(encoding="utf-8")


def demo_config(host: str, port: int, state_dir: Path, embedded: bool = False) -> AgentConfig:
    data: dict[str, Any] = tomllib.loads(demo_config_text())
    data.setdefault("mqtt", {}).update({"host": host, "port": port})
    if embedded:
        # amqtt speaks only MQTT 3.1.1 and stalls on an MQTT 5 CONNECT with a will.
        data["mqtt"]["protocol"] = "3.1.1"
    data.setdefault("outbox", {})["path"] = str(state_dir / "outbox.db")
    data.setdefault("control", {})["socket"] = str(state_dir / "control.sock")
    return parse_config(data, "demo.toml")


def summarize(topic_tail: str, payload: bytes, width: int = 150) -> str:
    """One line for a feed message, for a human watching the demo."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return payload[:80].decode(errors="replace")
    if not isinstance(doc, dict):
        return str(doc)[:80]
    parts: list[str] = [f"seq {doc['seq']}"] if "seq" in doc else []
    if doc.get("replayed"):
        parts.append("(replayed)")
    # What a watcher cares about first: model outputs, derived values, fused, then channels.
    for key in ("outputs", "derived", "fused", "channels"):
        section = doc.get(key)
        if isinstance(section, dict):
            parts.extend(_fmt_items(section))
    if "quantity" in doc and "value" in doc:
        parts.append(f"{doc.get('sensor', '')}.{doc['quantity']}={_num(doc['value'])}")
    health = doc.get("health")
    sensors = health.get("sensors") if isinstance(health, dict) else None
    if topic_tail == "health" and isinstance(sensors, list):
        parts.append(" ".join(f"{s.get('name')}:{s.get('state')}" for s in sensors
                              if isinstance(s, dict)))
    if "state" in doc and isinstance(doc["state"], str):
        parts.append(doc["state"])
    line = "  ".join(parts)
    return line if len(line) <= width else line[: width - 3] + "..."


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt_items(section: dict[str, Any]) -> list[str]:
    out = []
    for k, v in section.items():
        value = v.get("mean", v.get("value", "")) if isinstance(v, dict) else v
        if value is None:
            continue
        out.append(f"{k}={_num(value)}")
    return out


@dataclass
class _Watch:
    host: str
    port: int
    topic: str
    quiet: bool
    started: float
    counts: dict[str, int] = field(default_factory=dict)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)


async def _watch(w: _Watch) -> None:
    import aiomqtt

    prefix_len = len(w.topic) - 1
    async with aiomqtt.Client(w.host, w.port, identifier=f"edge-agent-demo-{int(w.started)}",
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.subscribe(w.topic, qos=1)
        w.subscribed.set()
        async for msg in client.messages:
            tail = str(msg.topic)[prefix_len:]
            kind = tail.split("/", 1)[0]
            w.counts[kind] = w.counts.get(kind, 0) + 1
            if not w.quiet:
                payload = msg.payload if isinstance(msg.payload, bytes) else b""
                print(f"{time.monotonic() - w.started:7.1f}s  {tail:<24} "
                      f"{summarize(tail, payload)}", flush=True)


async def run_demo(duration_s: float | None = None, broker: str | None = None,
                   state_dir: str | None = None, quiet: bool = False,
                   log_level: str = "warning") -> int:
    from agent import logs
    from agent.demo.broker import EmbeddedBroker
    from agent.runtime import Agent

    logs.setup(log_level, "text")
    started = time.monotonic()
    stop = asyncio.Event()
    stopped_by: list[int] = []

    def on_signal(sig: int) -> None:
        stopped_by.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    async with contextlib.AsyncExitStack() as stack:
        if state_dir is None:
            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-agent-")))
        else:
            state = Path(state_dir)
            state.mkdir(parents=True, exist_ok=True)
        if broker:
            host, _, port_s = broker.rpartition(":")
            if not host or not port_s.isdigit():
                print(f"--broker: {broker!r} is not HOST:PORT", file=sys.stderr)
                return 2
            port = int(port_s)
        else:
            emb = await stack.enter_async_context(EmbeddedBroker())
            host, port = emb.host, emb.port
        cfg = demo_config(host, port, state, embedded=not broker)
        topic = f"{cfg.mqtt.topic_prefix}/{cfg.gateway.id}/#"
        print(f"edge-agent demo: broker {host}:{port}, gateway {cfg.gateway.id}, "
              f"{len(cfg.sensors)} emulated sensors; watching {topic}"
              + ("" if duration_s else " (Ctrl-C to stop)"), flush=True)
        print(f"edge-agent demo: control socket {cfg.control.socket} (`edge-agent status`, "
              "`tail` and `outbox` in another terminal find it by themselves)", flush=True)
        with contextlib.suppress(OSError):  # a read-only runtime dir: --socket still works
            discovery.announce(cfg.control.socket)
        stack.callback(discovery.withdraw)
        watch = _Watch(host, port, topic, quiet, started)
        watcher = asyncio.create_task(_watch(watch), name="watch")
        with contextlib.suppress(TimeoutError):
            await within(watch.subscribed.wait(), SUBSCRIBE_TIMEOUT_S)
        agent = Agent(cfg)
        agent_task = asyncio.create_task(agent.run(install_signals=False), name="agent")
        stopper = asyncio.create_task(stop.wait(), name="demo-stop")
        try:
            await asyncio.wait({agent_task, watcher, stopper}, timeout=duration_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            agent.request_stop()
            rc = 1
            with contextlib.suppress(Exception):
                rc = await within(agent_task, 10.0)
            # Let the last published messages reach the watcher before it goes.
            await asyncio.sleep(0.5)
            for t in (watcher, stopper):
                t.cancel()
            await asyncio.gather(watcher, stopper, return_exceptions=True)
    total = sum(watch.counts.values())
    summary = ", ".join(f"{k} {v}" for k, v in sorted(watch.counts.items())) or "nothing"
    print(f"edge-agent demo: {total} messages received in {time.monotonic() - started:.1f} s "
          f"({summary}); agent exit code {rc}")
    if stopped_by:  # Ctrl-C 130, SIGTERM 143: the shell's code for a signal
        return 128 + stopped_by[0]
    return 0 if total and rc == 0 else 1
