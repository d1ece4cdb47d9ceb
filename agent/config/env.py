"""Environment overrides of configuration keys: ``EDGE_AGENT__SECTION__KEY=value``.

A list item is named by its index (``EDGE_AGENT__SENSORS__0__PERIOD_S``). An override that
cannot apply (an index past the end of the list, a name where the list needs an index, a key
below a value that is not a table) is a problem of its own, named by the variable; one that
applies and then fails validation is reported against the variable too, not the file. An
override naming a whole table or list is left out: only scalar keys are overridden.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "EDGE_AGENT__"
_ENV_KEY = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Override:
    """A variable that set the key at ``loc`` (``("sensors", 0, "period_s")``)."""

    var: str
    loc: tuple[int | str, ...]


@dataclass(frozen=True)
class Unusable:
    """A variable that names no key this config can have, and why."""

    var: str
    reason: str


def apply_env(data: dict[str, Any], env: Mapping[str, str],
              applied: list[Override] | None = None,
              unusable: list[Unusable] | None = None) -> dict[str, Any]:
    """Override scalar keys from ``EDGE_AGENT__A__B=value``; what was set goes to ``applied``
    and what could not be to ``unusable``."""
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or not _ENV_KEY.match(key):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        node: Any = data
        loc: list[int | str] = []
        problem = ""
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit():
                    problem = f"{_dotted(loc)} is a list: name an item by its index"
                elif int(part) >= len(node):
                    problem = (f"{_dotted(loc)} has {len(node)} items, so there is no "
                               f"index {part}")
                else:
                    node = node[int(part)]
                    loc.append(int(part))
                    continue
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
                loc.append(part)
                continue
            else:
                problem = f"{_dotted(loc)} is a value, not a table: it has no key {part!r}"
            break
        last = parts[-1]
        if not problem and isinstance(node, list):
            problem = (f"{_dotted(loc)} is a list: name an item by its index"
                       if not last.isdigit() else f"{_dotted(loc)}[{last}] is an item, not a "
                       "key: name a key of it")
        elif not problem and not isinstance(node, dict):
            problem = f"{_dotted(loc)} is a value, not a table: it has no key {last!r}"
        if problem:
            if unusable is not None:
                unusable.append(Unusable(key, problem))
            continue
        if isinstance(node, dict) and not isinstance(node.get(last), (dict, list)):
            node[last] = _env_value(value)
            if applied is not None:
                applied.append(Override(key, (*loc, last)))
    return data


def _dotted(loc: list[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _env_value(text: str) -> Any:
    """Interpret a value as TOML would (numbers, booleans, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        # Not TOML (or nested past the parser, or an integer past int's digit limit): the
        # schema judges it as the bare string it is.
        return text
