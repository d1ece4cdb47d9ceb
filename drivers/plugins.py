"""Third-party drivers: packages that register under the entry-point group
``edge_agent.drivers``.

An entry point names a module (``hello = "edge_agent_hello.driver"``) that provides:

- ``build(cfg, ctx) -> Sensor`` (required), the same contract as a built-in driver;
- ``Options``: a pydantic model of its ``[sensors.options]``, validated with the config;
- ``DESCRIPTION`` (one line) and ``KIND`` (``serial``, ``i2c`` or ``virtual``; default virtual).

Discovery reads only package metadata; a plugin module is imported when a config names it or
``sensors drivers`` lists it. One that fails to import is reported with its error and never
stops the other drivers: its sensors fail in the supervisor like an unplugged device.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

GROUP = "edge_agent.drivers"


@dataclass(frozen=True)
class Plugin:
    name: str
    target: str  # the entry point's value: module[:attribute]
    distribution: str  # "name version" of the package that registered it


class PluginError(ImportError):
    """A plugin could not be loaded; carries the plugin's name and origin."""


_cache: dict[str, dict[str, Plugin]] = {}
_loaded: dict[str, ModuleType | Any] = {}
_failed: dict[str, str] = {}


def discover(refresh: bool = False) -> dict[str, Plugin]:
    """Plugins by driver name (metadata only; nothing is imported)."""
    if "found" in _cache and not refresh:
        return _cache["found"]
    found: dict[str, Plugin] = {}
    try:
        eps = importlib.metadata.entry_points(group=GROUP)
    except Exception as exc:  # broken metadata of some unrelated package
        log.warning("cannot read driver plugin metadata: %s", exc)
        eps = importlib.metadata.EntryPoints(())
    for ep in eps:
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "unknown package"
        if ep.name in found:
            log.warning("driver plugin %r registered twice (%s, %s); keeping the first",
                        ep.name, found[ep.name].distribution, origin)
            continue
        found[ep.name] = Plugin(ep.name, ep.value, origin)
    _cache["found"] = found
    if refresh:
        _loaded.clear()
        _failed.clear()
    return found


def load(name: str) -> Any:
    """The plugin's module (or object); PluginError naming plugin and package on failure."""
    if name in _loaded:
        return _loaded[name]
    plugin = discover()[name]
    if name in _failed:
        raise PluginError(_failed[name])
    try:
        obj = importlib.metadata.EntryPoint(name, plugin.target, GROUP).load()
        if not callable(getattr(obj, "build", None)):
            raise TypeError("it has no build(cfg, ctx) function")
    except Exception as exc:
        reason = (f"driver plugin {name!r} from {plugin.distribution} ({plugin.target}) "
                  f"failed to load: {type(exc).__name__}: {exc}")
        log.error("%s", reason)
        _failed[name] = reason
        raise PluginError(reason) from None
    _loaded[name] = obj
    return obj


def failure(name: str) -> str:
    """Why plugin ``name`` failed to load ("" if it did not, or was not tried)."""
    return _failed.get(name, "")
