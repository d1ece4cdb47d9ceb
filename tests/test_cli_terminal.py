"""`edge-agent status` on a real pseudo-terminal: colour on, and the table fits the terminal's
width (each sensor and model on one line) at 80 and at 160 columns."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.test_control import FakeAgent, serving, short_dir

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def run_on_pty(argv: list[str], columns: int, rows: int = 50) -> tuple[int, str]:
    """Run the CLI with a pty of ``columns`` x ``rows`` as its terminal; (exit code, output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if k not in {"NO_COLOR", "COLUMNS", "LINES", "TERM", "FORCE_COLOR"}}
    env.update(TERM="xterm-256color", PYTHONPATH=str(Path.cwd()))
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli.main", *argv], stdin=slave,
                            stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return rc, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


@pytest.mark.parametrize("columns", [80, 160])
async def test_status_table_fits_the_terminal_with_colour(columns: int) -> None:
    pytest.importorskip("rich")
    with short_dir() as d:
        path = d / "control.sock"
        async with serving(FakeAgent(), path, group=None, export_dir=d):
            rc, out = await asyncio.wait_for(asyncio.to_thread(
                run_on_pty, ["status", "--socket", str(path)], columns), 60)
    assert rc == 0, out
    assert "\x1b[" in out, "colour on a terminal"
    assert "Traceback" not in out
    plain = ANSI.sub("", out)
    lines = plain.splitlines()
    assert lines and max(len(line) for line in lines) <= columns, plain
    bme = [line for line in lines if line.startswith("bme ")]
    radar = [line for line in lines if line.startswith("radar ")]
    model = [line for line in lines if line.startswith("traffic ")]
    assert len(bme) == len(radar) == len(model) == 1, plain  # one line each, never wrapped
    assert "bme280" in bme[0] and " up " in bme[0] and re.search(r" \d+(\.\d)? s ", bme[0])
    assert "down" in radar[0] and re.search(r" 9\d s ", radar[0])
    # The row itself must not wrap onto a continuation line.
    after = lines[lines.index(bme[0]) + 1]
    assert after.startswith("radar "), plain
    if columns >= 160:  # room for everything, quality flag included (cells are not markup)
        assert "temperature 23.41 degC, humidity 48.2 %RH" in bme[0]
        assert "speed 12.5 m/s [suspect]" in radar[0]
        assert "7 (4 in a row): SerialTimeout: no frame within 2.0 s" in radar[0]
    else:
        assert "…" in radar[0], "the elastic columns are cut with an ellipsis"
