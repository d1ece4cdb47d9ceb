"""Where the commands look for things nobody named: the installed config file."""

from __future__ import annotations

import os

DEFAULT_CONFIG = "/etc/edge-agent/agent.toml"  # what install-service writes


def missing_config(path: str) -> str | None:
    """A line saying the config at ``path`` is not there and what to do; None if it exists."""
    if os.path.exists(path):
        return None
    if path == DEFAULT_CONFIG:
        return (f"{path}: no such file (the default config): name one with -c FILE, or "
                "install the agent with `sudo edge-agent install-service`")
    return f"{path}: no such file"
