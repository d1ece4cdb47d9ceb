"""``edge-agent firmware ...`` handlers, called through a parser as the CLI mounts them."""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_bridge.cli import ProgressPrinter, register
from firmware_bridge.image import HEADER_BYTES, check_image

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_info_on_the_emulated_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["firmware", "info", "emulated"]) == 0
    out = capsys.readouterr().out
    assert "firmware" in out and "1.0.0 (slot A, boot 1)" in out
    assert "channels      0 loop, 1 loop, 2 pulse, 3 pulse" in out
    assert "uid" in out and "uptime" in out and "update        idle" in out
    assert "host link     rtt " in out and "retransmits 0" in out
    assert "clock         drift +0.0 ppm from 5 round trips" in out
    assert "device link   rx " in out


def test_pack_then_flash_the_emulated_device(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "app.bin"
    raw.write_bytes(random.Random(3).randbytes(48 * 1024))
    image = tmp_path / "app.img"
    assert run(["firmware", "pack", str(raw), str(image), "--version", "2.0.1"]) == 0
    assert check_image(image.read_bytes()).version == (2, 0, 1)
    assert run(["firmware", "flash", "emulated", str(image), "--window", "4",
                "--allow-unsigned"]) == 0
    out = capsys.readouterr().out
    assert "flashing 2.0.1 (" in out and "running 1.0.0" in out
    assert "flash: 0% (0/" in out and f"flash: 100% ({48 * 1024 + HEADER_BYTES}/" in out
    assert "\r" not in out  # piped: plain lines, no bar redrawn in place
    assert "ok: the device runs 2.0.1 (verified sha256" in out


def test_flash_refuses_a_file_that_is_not_an_image(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_bytes(b"hello" * 100)
    assert run(["firmware", "flash", "emulated", str(bogus)]) == 2
    assert "not a firmware image" in capsys.readouterr().out
    assert run(["firmware", "flash", "emulated", str(tmp_path / "missing.img")]) == 2
    assert "cannot read" in capsys.readouterr().out


def test_info_on_a_missing_port_fails_clearly(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    port = tmp_path / "ttyACM9"
    assert run(["firmware", "info", str(port), "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error: ") and str(port) in out and "cannot open the port" in out


def test_pack_rejects_a_bad_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "a.bin"
    raw.write_bytes(b"x")
    assert run(["firmware", "pack", str(raw), str(tmp_path / "o"), "--version", "1.2"]) == 2
    assert "is not a version MAJOR.MINOR.PATCH" in capsys.readouterr().out


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    bar = ProgressPrinter(out, interactive=True, width=10)
    for held in (0, 512, 1024):
        bar(held, 1024)
    bar.finish()
    text = out.getvalue()
    assert text.count("\r") == 3
    assert "[#####-----]  50.0%" in text and "[##########] 100.0% 1/1 KiB" in text
    assert text.endswith("\n")


@pytest.mark.parametrize("argv", [
    ["info", "emulated", "--baudrate", "-5"],
    ["info", "emulated", "--baudrate", "99999999999999999999"],
    ["info", "emulated", "--baudrate", "fast"],
    ["info", "emulated", "--timeout", "nan"],
    ["info", "emulated", "--timeout", "-1"],
    ["info", "emulated", "--timeout", "inf"],
    ["flash", "emulated", "x.img", "--boot-timeout", "0"],
])
def test_bad_arguments_are_usage_errors(argv: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["firmware", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --" in err and "Traceback" not in err


def test_files_that_are_not_files_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    for argv in (["flash", "emulated", str(fifo)], ["flash", "emulated", "/dev/zero"],
                 ["pack", str(fifo), str(tmp_path / "o.img"), "--version", "1.0.0"],
                 ["pack", "/dev/zero", str(tmp_path / "o.img"), "--version", "1.0.0"]):
        # A child process: a FIFO read would hang, /dev/zero would eat the memory.
        done = subprocess.run([sys.executable, "-m", "agent.cli.main", "firmware", *argv],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, done
        assert "not a regular file" in done.stdout and "Traceback" not in done.stderr
    assert not (tmp_path / "o.img").exists()
