"""Packaging: one distribution name everywhere an install is spelled out, and the runtime
dependencies a 32-bit gateway can resolve."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NAME = PYPROJECT["project"]["name"]
# `pip install NAME`, `pip install 'NAME[extra]'`, `pipx install NAME`, `pipx upgrade NAME`.
INSTALL = re.compile(r"\bpipx? (?:install|upgrade|inject)(?: -\S+)* '?\"?([A-Za-z][\w.-]*)")


def _texts() -> list[Path]:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for package in ("agent", "drivers", "firmware_bridge", "models", "systemd"):
        files += [p for p in (ROOT / package).rglob("*") if p.suffix in {".py", ".md", ".toml"}]
    return files


def test_the_distribution_is_not_the_unrelated_edge_agent() -> None:
    assert NAME == "edge-agent-gateway"
    assert PYPROJECT["project"]["scripts"] == {"edge-agent": "agent.cli.main:main"}


def test_every_install_instruction_names_this_distribution() -> None:
    seen = 0
    wrong = []
    for path in _texts():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in INSTALL.finditer(line):
                name = m.group(1)
                if name.startswith("edge") or name == "edge-agent":
                    seen += 1
                    if name != NAME and not name.startswith(f"{NAME}["):
                        wrong.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not wrong, "\n".join(wrong)
    assert seen >= 4  # operations.md, the pipx recipe, the demo and train messages


def test_the_example_plugin_depends_on_this_distribution() -> None:
    plugin = tomllib.loads((ROOT / "agent/examples/plugin/pyproject.toml").read_text())
    assert NAME in plugin["project"]["dependencies"]


def test_runtime_dependencies_have_no_crcmod_and_mark_onnxruntime() -> None:
    deps = PYPROJECT["project"]["dependencies"]
    assert not [d for d in deps if d.startswith("crcmod")]
    ort = [d for d in deps if d.startswith("onnxruntime")]
    assert ort == ["onnxruntime>=1.17; platform_machine != 'armv7l' and "
                   "platform_machine != 'armv6l' and platform_machine != 'armv8l'"]
