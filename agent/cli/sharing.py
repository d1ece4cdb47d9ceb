"""``edge-agent sharing show -c FILE``: what each stream shares, where, and at what detail.

Read from the configuration alone, so it can be checked before a gateway is installed.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from agent import jsontext
from agent.cli.defaults import DEFAULT_CONFIG, missing_config

if TYPE_CHECKING:
    from agent.config.schema import AgentConfig, StreamConfig

KIND_NAMES = {"raw": "readings", "window": "windows", "inference": "inferences"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sharing", help="what each stream publishes, on which topics, how redacted")
    cmds = p.add_subparsers(dest="sharing_command", required=True)
    show = cmds.add_parser("show", help="print the sharing policy of every stream")
    show.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                      help=f"agent TOML file (default {DEFAULT_CONFIG})")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from agent.config.load import ConfigError, load_config

    if missing := missing_config(args.config):
        print(missing, file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(line)
        return 2
    plan = describe(cfg)
    if args.json:
        print(jsontext.dumps(plan, indent=2))
    else:
        print("\n".join(render(plan)))
    return 0


def _namespace(ns: dict[str, Any], vehicles: bool) -> list[str]:
    who = f"audience {ns['audience']!r}" if ns["audience"] else "plain topics"
    if not ns["kinds"]:
        return [f"  {who}: local, nothing leaves the gateway"]
    out = [f"  {who}: share {ns['share']} ({', '.join(KIND_NAMES[k] for k in ns['kinds'])})"]
    topics = ns["topics"]
    if topics["raw"]:
        events = ("with" if ns["vehicle_events"]
                  else "without") + " per-vehicle speed readings"
        out.append(f"    readings    -> {topics['raw']} ({events})")
    if topics["window"]:
        out.append(f"    windows     -> {topics['window']}")
    for model, topic in topics["inference"].items():
        out.append(f"    inferences  -> {topic} (model {model})")
    if "inference" in ns["kinds"] and not topics["inference"]:
        out.append("    inferences  -> none (no enabled model reads this stream)")
    if ns["drop_default"]:
        out.append("    withheld    min, max and last of per-vehicle speed channels (default)"
                   if vehicles else "    withheld    nothing (no vehicle sensor)")
    elif ns["drop"]:
        out.append(f"    withheld    {', '.join(ns['drop'])}")
    else:
        out.append("    withheld    nothing")
    if ns["round"]:
        out.append("    rounded     " + ", ".join(f"{p} to {s:g}" for p, s in ns["round"].items()))
    k = ns["min_vehicles"]
    if k and "window" in ns["kinds"] and vehicles:
        out.append(f"    k rule      windows counting 1..{k - 1} vehicles are withheld, and "
                   f"speed statistics over fewer than {k} vehicles")
    return out


def render(plan: dict[str, Any]) -> list[str]:
    out = [f"gateway {plan['gateway']}: every topic is under {plan['base']}/",
           f"health -> {plan['health']} (last values only where the feed publishes them as "
           "they are)"]
    for st in plan["streams"]:
        out.append("")
        out.append(f"stream {st['name']} (sensors {', '.join(st['sensors'])}; "
                   f"windows of {st['window_s']:g} s)")
        vehicles = bool(st["vehicle_sensors"])
        if vehicles:
            out.append(f"  counts vehicles with {', '.join(st['vehicle_sensors'])}")
        for ns in st["namespaces"]:
            out.extend(_namespace(ns, vehicles))
    if not plan["streams"]:
        out.append("no streams: only health leaves the gateway")
    return out


def vehicle_sensors(cfg: AgentConfig, stream: StreamConfig) -> list[str]:
    """Sensors of ``stream`` known from the configuration to count or measure vehicles."""
    from agent.pipeline.derived import DRIVER_QUANTITIES, TRAFFIC

    out = []
    for name in dict.fromkeys(stream.sensors):
        s = cfg.sensor(name)
        known = DRIVER_QUANTITIES.get(s.driver, frozenset())
        if (known & TRAFFIC or (s.driver == "bridge" and s.options.get("kind") == "loop")
                or (s.driver == "synthetic" and s.options.get("quantity") in TRAFFIC)):
            out.append(name)
    return out


def describe(cfg: AgentConfig) -> dict[str, Any]:
    """What leaves the gateway, from the configuration alone (``edge-agent sharing show``)."""
    from agent.feed.sharing import namespaces

    base = f"{cfg.mqtt.topic_prefix}/{cfg.gateway.id}"
    streams = []
    for st in cfg.streams:
        models = [m.name for m in cfg.models if m.stream == st.name and m.enabled]
        spaces = []
        for ns in namespaces(st):
            kinds = ns.kinds
            spaces.append({
                "audience": ns.audience,
                "share": ns.share,
                "kinds": [k for k in ("raw", "window", "inference") if k in kinds],
                "topics": {
                    "raw": f"{base}/{ns.topic('raw', st.name)}" if "raw" in kinds else None,
                    "window": (f"{base}/{ns.topic('window', st.name)}"
                               if "window" in kinds else None),
                    "inference": {m: f"{base}/{ns.topic('inference', m)}" for m in models}
                    if "inference" in kinds else {},
                },
                "drop": list(ns.drop),
                "drop_default": ns.drop_default,
                "round": dict(ns.round),
                "min_vehicles": ns.min_vehicles if ns.min_vehicles > 1 else 0,
                "vehicle_events": ns.vehicle_events,
            })
        streams.append({"name": st.name, "sensors": list(st.sensors), "window_s": st.window_s,
                        "vehicle_sensors": vehicle_sensors(cfg, st), "models": models,
                        "namespaces": spaces})
    return {"gateway": cfg.gateway.id, "base": base, "health": f"{base}/health",
            "streams": streams}
