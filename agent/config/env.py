"""Environment overrides of configuration keys: ``EDGE_AGENT__SECTION__KEY=value``."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "EDGE_AGENT__"
_ENV_KEY = re.compile(r"^[A-Za-z0-9_]+$")


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Override scalar keys from `EDGE_AGENT__A__B=value` (list items by index: `__0__`)."""
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or not _ENV_KEY.match(key):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                node = None
                break
        last = parts[-1]
        if isinstance(node, dict) and not isinstance(node.get(last), (dict, list)):
            node[last] = _env_value(value)
    return data


def _env_value(text: str) -> Any:
    """Interpret a value as TOML would (numbers, booleans, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        # Not TOML (or nested past the parser, or an integer past int's digit limit): the
        # schema judges it as the bare string it is.
        return text
