"""The read-mostly cloud commands a generation answers itself: ``config.get``,
``sensors.read`` and ``model.activate`` (the fleet's deploys and config changes live in
``agent.fleet``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.config.schema import AgentConfig
from agent.feed.numbers import round_last_values
from agent.feed.sharing import SharingPolicy
from agent.supervisor import SensorSupervisor
from agent.uplink.commands import CommandError, Handler


def handlers(cfg: AgentConfig, supervisors: Callable[[], Sequence[SensorSupervisor]],
             sharing: SharingPolicy, activate: Callable[[str, bool], str]) -> dict[str, Handler]:
    async def config_get(args: dict[str, Any]) -> dict[str, Any]:
        whole = cfg.model_dump(mode="json", exclude={"mqtt": {"credentials_file", "key_file"}})
        section = args.get("section")
        if section is None:
            return whole
        if not isinstance(section, str) or section not in whole:
            raise CommandError(f"args.section: {str(section)[:64]!r} is not a section "
                               f"(sections: {', '.join(whole)})")
        return {section: whole[section]}

    async def sensors_read(args: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        name = args.get("name")
        sensors = [s.snapshot(now) for s in supervisors()
                   if name is None or s.health.name == name]
        if name is not None and not sensors:
            raise ValueError(f"no sensor named {name!r}")
        # The reply leaves the gateway: the sharing policy decides which values it may carry.
        return {"sensors": round_last_values(sharing.scrub_sensors(sensors))}

    async def model_activate(args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("name")
        if not isinstance(name, str):
            raise ValueError("args.name (the model to activate) is required")
        force = args.get("force") is True
        reason = activate(name, force)
        return {"activated": name, "force": force, "reason": reason}

    return {"config.get": config_get, "sensors.read": sensors_read,
            "model.activate": model_activate}
