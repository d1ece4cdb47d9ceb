"""Commands that destroy something ask first: `pzem reset-energy` on a terminal waits for a
yes, refuses without a terminal unless --yes, and only a yes zeroes the (emulated) meter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from drivers.emulated.pzem004t import PzemLine
from tests.test_serial_cli import emulator_thread

ROOT = Path(__file__).resolve().parent.parent


def _line() -> PzemLine:
    line = PzemLine()
    line.add_meter(3).energy_wh = 1234.0
    return line


def _reset_on_a_terminal(port: str, answer: bytes) -> tuple[int, str]:
    """Run the command on a pseudo-terminal (stdin, stdout and stderr, where Python's input()
    puts the question when it reads a terminal); type ``answer``; what the screen showed."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli.main", "pzem", "reset-energy", port,
             "--address", "3", "--timeout", "1"],
            stdin=slave, stdout=slave, stderr=slave,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        os.close(slave)
        seen = b""
        while b"[y/N]" not in seen:  # the question is on the screen: answer it
            chunk = os.read(master, 4096)
            assert chunk, f"the command ended without asking: {seen!r}"
            seen += chunk
        os.write(master, answer)
        try:
            while chunk := os.read(master, 4096):
                seen += chunk
        except OSError:  # EIO: the command has ended and closed its side of the terminal
            pass
        proc.wait(timeout=60)
    finally:
        os.close(master)
    screen = seen.decode(errors="replace")
    assert "Traceback" not in screen, screen
    return proc.returncode, screen


def test_no_keeps_the_counter_and_yes_zeroes_it() -> None:
    with emulator_thread(_line) as line:
        code, screen = _reset_on_a_terminal(line.path, b"n\n")
        assert code == 1 and "not reset" in screen, screen
        assert line.meters[3].energy_wh > 0
        code, screen = _reset_on_a_terminal(line.path, b"y\n")
        assert code == 0 and "energy counter reset on meter 0x03" in screen, screen
        assert line.meters[3].energy_wh == 0.0


def test_without_a_terminal_it_refuses_unless_yes() -> None:
    with emulator_thread(_line) as line:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli.main", "pzem", "reset-energy", line.path,
             "--address", "3"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        assert proc.returncode == 2 and "add --yes" in proc.stdout, proc.stdout
        assert line.meters[3].energy_wh > 0
