"""Commands that read the agent's config find the installed one by themselves, and say which
file they looked for when it is not there."""

from __future__ import annotations

import os

import pytest

from agent.cli.defaults import DEFAULT_CONFIG
from agent.cli.main import build_parser, main


@pytest.mark.parametrize("argv", [["run"], ["sensors", "read", "env"], ["sharing", "show"],
                                  ["model", "history", "export"]])
def test_the_config_defaults_to_the_installed_one(argv: list[str]) -> None:
    assert build_parser(argv).parse_args(argv).config == DEFAULT_CONFIG


@pytest.mark.parametrize("argv", [["run"], ["sensors", "read", "env"], ["sharing", "show"]])
def test_a_missing_default_config_is_named_with_what_to_do(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    if os.path.exists(DEFAULT_CONFIG):
        pytest.skip(f"{DEFAULT_CONFIG} exists on this machine")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{DEFAULT_CONFIG}: no such file (the default config)")
    assert "-c FILE" in err and "install-service" in err
