"""Fleet scale: many simulated gateways, each a real Outbox and Uplink, on one mosquitto.

    python -m bench.fleet                      # 1,000 gateways over 4 processes
    python -m bench.fleet --gateways 200 --procs 2 --json

Each gateway is what the agent runs between its pipeline and the broker: its own SQLite outbox
(on tmpfs) and its own ``Uplink`` (paho, QoS 1, its own client id), producing one health-sized
message every ``--period`` seconds. An independent subscriber (its own process, a persistent
session) records every (gateway, seq) it receives.

The broker is restarted twice, once with ``mqtt.reconnect_spread_s = 0`` (the baseline: every
gateway reconnects as soon as the port is open) and once at the default. For each, the report
gives the peak connect rate seen by the broker (its own log, one-second bins), the time from the
broker's start until every gateway is connected again, and, after a final drain, how many
accepted messages the subscriber never received (lost) and received twice (duplicated).

After the second restart, while the gateways keep producing, the cloud side (its own process,
``bench.fleet_deploy``) deploys the shipped energy model, signed, to every gateway and collects
a result per gateway: succeeded, failed by reason, total and p50/p99 per-gateway time, beside a
``ping`` round trip to each gateway over the same connection. The gateways then say what they
run. The exit status is 1 if any gateway failed or any message was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import multiprocessing as mp
import os
import re
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.config.schema import MqttConfig
from agent.feed.messages import health_message
from agent.fleet.signing import SigningKey
from agent.outbox.store import Outbox
from bench.fleet_deploy import FleetGateway, check_deployed, cloud, gateway_config
from tests.broker import Mosquitto

PREFIX = "fleet"
CONNECT_LINE = re.compile(r"^(\d+): New client connected from \S+ as (gw-\d+)")


def _gateway_id(i: int) -> str:
    return f"gw-{i:05d}"


# -- one worker process: a slice of the fleet ---------------------------------------------


async def _worker_main(ids: list[str], host: str, port: int, tmp: str, period_s: float,
                       spread_s: float, key: tuple[str, str], conn: Connection) -> None:
    mqtt = MqttConfig(host=host, port=port, topic_prefix=PREFIX, keepalive_s=30,
                      reconnect_spread_s=spread_s)
    fleet: list[FleetGateway] = []
    first: dict[str, int] = {}
    for gw in ids:
        g = FleetGateway(gateway_config(gw, Path(tmp) / gw,
                                        mqtt.model_copy(update={"client_id": gw}), *key))
        first[gw] = g.outbox.next_seq  # a new outbox starts its seq from the wall clock
        fleet.append(g)
    gateways = [(g.id, g.outbox, g.uplink) for g in fleet]
    producing = asyncio.Event()
    producing.set()

    async def produce(gw: str, ob: Outbox, offset: float) -> None:
        await asyncio.sleep(offset)  # spread the producers' phases over one period
        n = 0
        while producing.is_set():
            n += 1
            ob.put("health", "health", health_message(gw, {"n": n, "pad": "x" * 200}))
            await asyncio.sleep(period_s)

    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:
        for k, (gw, ob, up) in enumerate(gateways):
            tg.create_task(ob.run(), name=f"outbox-{gw}")
            tg.create_task(up.run(), name=f"uplink-{gw}")
            tg.create_task(produce(gw, ob, period_s * k / len(gateways)), name=f"produce-{gw}")
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "connected":
                conn.send(sum(up.status()["state"] == "connected" for _, _, up in gateways))
            elif cmd == "stop-producing":
                producing.clear()
                conn.send(True)
            elif cmd == "drain":
                for _, ob, _ in gateways:
                    ob.flush()
                done = await asyncio.gather(*(up.drain(120) for _, _, up in gateways))
                conn.send({"drained": all(done),
                           "accepted": {gw: (first[gw], ob.accepted_seq)
                                        for gw, ob, _ in gateways}})
            elif cmd == "deployed":
                conn.send(check_deployed(fleet))
            elif cmd == "quit":
                break
        for t in list(asyncio.all_tasks()):
            if t is not asyncio.current_task():
                t.cancel()
    for g in fleet:
        g.close()


def _worker(ids: list[str], host: str, port: int, tmp: str, period_s: float, spread_s: float,
            key: tuple[str, str], conn: Connection) -> None:
    logging.basicConfig(level=logging.ERROR)
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(_worker_main(ids, host, port, tmp, period_s, spread_s, key, conn))


# -- the subscriber: what the cloud received ----------------------------------------------


def _subscriber(host: str, port: int, conn: Connection) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    received: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        body = json.loads(msg.payload)
        with lock:
            received[body["gateway"]][body["seq"]] += 1

    def on_connect(c: Any, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        c.subscribe(f"{PREFIX}/+/health", qos=1)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fleet-bench-cloud",
                         clean_session=False)
    client.max_queued_messages_set(0)
    client.on_message = on_message
    client.on_connect = on_connect
    client.reconnect_delay_set(0.1, 1.0)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    conn.send("ready")
    while (cmd := conn.recv()) != "quit":
        if cmd == "report":
            with lock:
                conn.send({gw: dict(c) for gw, c in received.items()})
    client.loop_stop()
    client.disconnect()


# -- the run -------------------------------------------------------------------------------


class Fleet:
    def __init__(self, n: int, procs: int, host: str, port: int, tmp: str, period_s: float,
                 spread_s: float, key: tuple[str, str]) -> None:
        ctx = mp.get_context("spawn")
        ids = [_gateway_id(i) for i in range(n)]
        self.ids = ids
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for k in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, name=f"fleet-{k}",
                            args=(ids[k::procs], host, port, tmp, period_s, spread_s, key,
                                  child))
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def ask(self, cmd: str, timeout_s: float = 180.0) -> list[Any]:
        for p in self.pipes:
            p.send(cmd)
        out = []
        for p in self.pipes:
            if not p.poll(timeout_s):
                raise RuntimeError(f"a worker did not answer {cmd!r} within {timeout_s} s")
            out.append(p.recv())
        return out

    def wait_connected(self, timeout_s: float) -> float:
        """Seconds until every gateway is connected; raise past ``timeout_s``."""
        t0 = time.monotonic()
        while (n := sum(self.ask("connected"))) < len(self.ids):
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"only {n} of {len(self.ids)} gateways connected after "
                                   f"{timeout_s} s")
            time.sleep(0.2)  # poll interval of a bounded wait
        return time.monotonic() - t0

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            for p in self.pipes:
                p.send("quit")
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _missing(accepted: dict[str, tuple[int, int]], got: dict[str, dict[int, int]]) -> int:
    return sum(1 for gw, (lo, hi) in accepted.items() for s in range(lo, hi + 1)
               if s not in got.get(gw, {}))


def _received(sub: Connection, accepted: dict[str, tuple[int, int]],
              quiet_s: float = 10.0) -> dict[str, dict[int, int]]:
    """The subscriber's (gateway, seq) counts, once it has every accepted message or has
    received nothing new for ``quiet_s``: a PUBACK to the gateway comes before the broker's
    delivery to the subscriber, so a report right after the drain can be short."""
    last, since = -1, time.monotonic()
    while True:
        sub.send("report")
        if not sub.poll(60):
            raise RuntimeError("the subscriber did not report")
        got: dict[str, dict[int, int]] = sub.recv()
        missing = _missing(accepted, got)
        if missing == 0 or time.monotonic() - since > quiet_s:
            return got
        if missing != last:
            last, since = missing, time.monotonic()
        time.sleep(0.2)  # poll interval of a bounded wait


def _connects_after(log: Path, since_s: int) -> list[int]:
    """Unix seconds of every gateway connect the broker logged at or after ``since_s``."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = CONNECT_LINE.match(line)
        if m and int(m.group(1)) >= since_s:
            out.append(int(m.group(1)))
    return out


def _deploy(host: str, port: int, ids: list[str], key_path: Path, fleet: Fleet,
            timeout_s: float) -> dict[str, Any]:
    """The cloud's signed deploy to every gateway (its own process), and what they say."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=cloud, name="fleet-cloud",
                    args=(host, port, PREFIX, ids, str(key_path), child))
    p.start()
    try:
        if not parent.poll(timeout_s):
            raise RuntimeError(f"the deploy did not finish within {timeout_s} s")
        out: dict[str, Any] = parent.recv()
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    if "error" in out:
        raise RuntimeError(f"the cloud side failed: {out['error']}")
    seen: dict[str, Any] = {"in_shadow": 0, "wrong": {}, "refused": collections.Counter(),
                            "refused_commands": collections.Counter(),
                            "commands": collections.Counter()}
    for part in fleet.ask("deployed"):
        seen["in_shadow"] += part["in_shadow"]
        seen["wrong"].update(part["wrong"])
        seen["refused"].update(part["refused"])
        seen["refused_commands"].update(part["refused_commands"])
        seen["commands"].update(part["commands"])
    out["gateways_say"] = {"in_shadow": seen["in_shadow"],
                           "wrong": dict(list(seen["wrong"].items())[:10]),
                           "wrong_count": len(seen["wrong"]),
                           "refused": dict(seen["refused"]),
                           "refused_commands": dict(seen["refused_commands"]),
                           "commands": dict(seen["commands"])}
    return out


def one_run(n: int, procs: int, period_s: float, spread_s: float, outage_s: float,
            steady_s: float, deploy: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        broker = Mosquitto(Path(d) / "broker", extra_conf=(
            "log_type notice\nconnection_messages true\nlog_timestamp true\n"
            "log_timestamp_format %s\nmax_connections -1\n"))
        broker.start()
        ctx = mp.get_context("spawn")
        sub_parent, sub_child = ctx.Pipe()
        sub = ctx.Process(target=_subscriber, args=(broker.host, broker.port, sub_child))
        sub.start()
        if not sub_parent.poll(30):
            raise RuntimeError("the subscriber did not start")
        sub_parent.recv()
        (Path(d) / "gw").mkdir()
        key = SigningKey.generate("fleet-ops")
        key.save(Path(d) / "ops.key")
        fleet = Fleet(n, procs, broker.host, broker.port, f"{d}/gw", period_s, spread_s,
                      (key.key_id, key.public))
        deployed: dict[str, Any] | None = None
        try:
            first_up_s = fleet.wait_connected(300)
            time.sleep(steady_s)  # traffic before the outage (pacing, not synchronisation)
            broker.stop()
            time.sleep(outage_s)  # the outage's length
            since = int(time.time())
            t_start = time.monotonic()
            broker.start()
            fleet.wait_connected(300)
            back_s = time.monotonic() - t_start
            time.sleep(steady_s)
            if deploy:  # while the gateways keep producing: the feed must lose nothing
                deployed = _deploy(broker.host, broker.port, fleet.ids, Path(d) / "ops.key",
                                   fleet, 3600)
            fleet.ask("stop-producing")
            drained = fleet.ask("drain", 300)
            accepted: dict[str, tuple[int, int]] = {}
            for part in drained:
                accepted.update(part["accepted"])
            got = _received(sub_parent, accepted)
        finally:
            fleet.close()
            with contextlib.suppress(OSError, BrokenPipeError):
                sub_parent.send("quit")
            sub.join(10)
            if sub.is_alive():
                sub.kill()
            broker.stop()
        connects = _connects_after(broker.log, since)
    per_s = collections.Counter(connects)
    lost = dup = 0
    for gw, (lo, hi) in accepted.items():
        seen = got.get(gw, {})
        lost += sum(1 for s in range(lo, hi + 1) if s not in seen)
        dup += sum(c - 1 for c in seen.values() if c > 1)
    return {
        "gateways": n, "reconnect_spread_s": spread_s,
        "all_connected_at_start_s": round(first_up_s, 2),
        "outage_s": outage_s,
        "all_back_after_broker_start_s": round(back_s, 2),
        "reconnects_logged": len(connects),
        "peak_connects_per_s": max(per_s.values(), default=0),
        "drained": all(p["drained"] for p in drained),
        "accepted": sum(hi - lo + 1 for lo, hi in accepted.values()),
        "received": sum(len(v) for v in got.values()),
        "lost": lost, "duplicated": dup,
        **({"model_deploy": deployed} if deployed is not None else {}),
    }


def _deploy_ok(d: dict[str, Any], n: int) -> bool:
    return (d["deploy"]["ok"] == n and not d["deploy"]["failed"]
            and d["gateways_say"]["in_shadow"] == n)


def _print_deploy(d: dict[str, Any]) -> None:
    dep, ping = d["deploy"], d["ping"]
    print(f"\nmodel.deploy to every gateway ({dep['model_bytes']} bytes, "
          f"{'signed' if d['signed_commands'] else 'plain'} commands, signed artifact, "
          f"{d['concurrency']} at a time)")
    print(f"{'figure':<44} {'deploy':>10} {'ping':>10} {'ratio':>7}")
    for key in ("ok", "total_s", "p50_s", "p99_s", "max_s"):
        x, b = dep[key], ping[key]
        ratio = f"{x / b:.1f}" if b else "-"
        print(f"{key:<44} {x:>10} {b:>10} {ratio:>7}")
    print(f"{'failed (by reason)':<44} {json.dumps(dep['failed'])}  ping: "
          f"{json.dumps(ping['failed'])}")
    print(f"{'requests, chunks sent':<44} {dep['requests']}, {dep['chunks_sent']}")
    say = d["gateways_say"]
    print(f"{'gateways running it in shadow':<44} {say['in_shadow']}  (not: "
          f"{say['wrong_count']}; artifacts refused: {json.dumps(say['refused'])}, commands "
          f"refused: {json.dumps(say['refused_commands'])})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--period", type=float, default=2.0,
                    help="seconds between one gateway's messages (default 2)")
    ap.add_argument("--outage", type=float, default=5.0, help="broker down for (s)")
    ap.add_argument("--steady", type=float, default=10.0, help="traffic before/after (s)")
    ap.add_argument("--spread", type=float, default=MqttConfig().reconnect_spread_s,
                    help="reconnect_spread_s of the second run (default: the config default)")
    ap.add_argument("--no-deploy", action="store_true",
                    help="skip the model.deploy to every gateway after the second restart")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    runs = []
    for spread in (0.0, a.spread):
        print(f"{a.gateways} gateways, reconnect_spread_s = {spread:g} ...", file=sys.stderr)
        runs.append(one_run(a.gateways, a.procs, a.period, spread, a.outage, a.steady,
                            deploy=not a.no_deploy and spread == a.spread))
    base, agent = runs
    deployed = agent.get("model_deploy")
    ok = (agent["lost"] == 0 and base["lost"] == 0
          and (deployed is None or _deploy_ok(deployed, a.gateways)))
    if a.json:
        print(json.dumps({"baseline": base, "default": agent}, indent=2))
        return 0 if ok else 1
    print(f"{'figure':<44} {'default':>10} {'spread 0':>10} {'ratio':>7}")
    for key in ("peak_connects_per_s", "all_back_after_broker_start_s", "reconnects_logged",
                "accepted", "received", "lost", "duplicated"):
        x, b = agent[key], base[key]
        ratio = f"{x / b:.2f}" if isinstance(b, int | float) and b else "-"
        print(f"{key:<44} {x:>10} {b:>10} {ratio:>7}")
    if deployed is not None:
        _print_deploy(deployed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
