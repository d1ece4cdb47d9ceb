"""Shell completion generated from the parser: bash's own `complete -p` and completion function
run against the script `edge-agent completion bash` prints, zsh's against the zsh one (with
compadd recorded), and install-service / uninstall-service putting them in place and away."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.completion import BASH_FILE, ZSH_FILE
from agent.cli.main import build_parser, main
from tests.test_cli_signals import _leaves

ROOT = Path(__file__).resolve().parent.parent


def _script(shell: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "agent.cli.main", "completion", shell],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def _bash(script: Path, lines: list[str]) -> list[str]:
    """Each line is the words typed so far (the last one is being completed); the answer is
    what the completion function offers, space-separated, one line per case."""
    body = [f"source {script}",
            't() { COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); _edge_agent; '
            'echo "${COMPREPLY[*]}"; }']
    body += [f"t {line}" for line in lines]
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", "\n".join(body)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout.splitlines()


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "edge-agent.bash"
    path.write_text(_script("bash"))
    return path


def test_bash_registers_the_function(bash_script: Path) -> None:
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                           f"source {bash_script}; complete -p edge-agent"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout.strip() == "complete -o default -F _edge_agent edge-agent", proc.stderr


def test_bash_completes_commands_options_and_choices(bash_script: Path) -> None:
    got = _bash(bash_script, [
        "edge-agent st", "edge-agent model ''", "edge-agent model history ''",
        "edge-agent serial sniff --driver p", "edge-agent status --socket /tmp/x --j",
        "edge-agent completion ''", "edge-agent config check ''", "edge-agent tail model --c"])
    assert got == ["status", "list test verify train history activate -h --help",
                   "export -h --help", "pzem004t pms5003", "--json", "bash zsh -h --help",
                   "", "--config --count"]


def test_bash_offers_every_command_of_the_parser(bash_script: Path) -> None:
    """Each step of each command path is offered after the words before it."""
    leaves = sorted(_leaves())
    cases = []
    for path in leaves:
        words = path.split()
        cases.append(("edge-agent " + " ".join(words[:-1]) + f" {words[-1][:-1]}", words[-1]))
    got = _bash(bash_script, [typed for typed, _ in cases])
    for (typed, want), offered in zip(cases, got, strict=True):
        assert want in offered.split(), f"{typed!r} offered {offered!r}, not {want!r}"
    assert len(leaves) == len(_leaves()) > 30


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed here")
def test_zsh_completes_like_bash(tmp_path: Path) -> None:
    script = tmp_path / "_edge-agent"
    script.write_text(_script("zsh"))
    assert script.read_text().startswith("#compdef edge-agent\n")
    cases = [("edge-agent model ''", "list test verify train history activate -h --help"),
             ("edge-agent serial sniff --driver ''", "ops243 pzem004t pms5003"),
             ("edge-agent config check ''", "FILES")]
    body = ["compadd() { [[ $1 == -- ]] && shift; print -r -- \"$*\" }",
            "_files() { print FILES }"]
    for typed, _ in cases:
        body.append(f"words=({typed}); CURRENT=${{#words}}; PREFIX=''; source {script}")
    proc = subprocess.run(["zsh", "-f", "-c", "\n".join(body)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.splitlines() == [want for _, want in cases]


def test_install_service_installs_completion_and_uninstall_removes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "image"
    assert main(["install-service", "--root", str(root), "--exec", "/usr/bin/edge-agent"]) == 0
    bash, zsh = root / BASH_FILE, root / ZSH_FILE
    assert bash.read_text() == _script("bash") and zsh.read_text() == _script("zsh")
    assert oct(bash.stat().st_mode & 0o777) == "0o644"
    assert main(["uninstall-service", "--root", str(root)]) == 0
    assert not bash.exists() and not zsh.exists()
    out = capsys.readouterr().out
    assert f"remove       {bash}" in out and f"remove       {zsh}" in out


def test_the_script_follows_the_parser() -> None:
    from agent.cli.completion import script

    text = script("bash", build_parser(None))
    for path in _leaves():
        assert f'"{path}") words=' in text
