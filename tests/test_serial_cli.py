"""The serial CLI commands, run through an argparse parser against emulators on ptys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import serial

from drivers.emulated.pms5003 import Pms5003Emulator
from drivers.emulated.pty import PtyDevice
from drivers.emulated.pzem004t import PzemLine
from drivers.serial import cli
from drivers.serial.pms5003 import PmsFrame
from drivers.serial.pzem004t import Measurement

D = TypeVar("D", bound=PtyDevice)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-agent")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run(*argv: str) -> int:
    args = parse(*argv)
    code: int = args.func(args)
    return code


def untimed(out: str) -> list[str]:
    """The lines of ``out`` without their arrival time (``HH:MM:SS.mmm  ``), which every
    line must have."""
    lines = out.splitlines()
    assert all(re.match(r"^\d\d:\d\d:\d\d\.\d{3}  ", line) for line in lines), lines
    return [line[14:] for line in lines]


@contextlib.contextmanager
def emulator_thread(make: Callable[[], D]) -> Iterator[D]:
    """Run an emulator on its own event loop, as a device beside the process would be: the
    CLI handlers own their loop (``asyncio.run``)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        box["dev"] = make()
        loop.run_until_complete(box["dev"].start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(box["dev"].close())
        loop.close()

    thread = threading.Thread(target=main, name="emulator-loop", daemon=True)
    thread.start()
    assert started.wait(5.0), "emulator did not start"
    try:
        yield box["dev"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        assert not thread.is_alive()


def test_reset_energy_command(capsys: pytest.CaptureFixture[str]) -> None:
    def make() -> PzemLine:
        line = PzemLine()
        line.add_meter(3).energy_wh = 4321.0
        return line

    with emulator_thread(make) as line:
        assert run("pzem", "reset-energy", line.path, "--address", "3", "--timeout", "0.5",
                   "--yes") == 0
        assert line.meters[3].energy_wh == 0.0
        assert f"energy counter reset on meter 0x03 at {line.path}" in capsys.readouterr().out
        assert run("pzem", "reset-energy", line.path, "--address", "0x09", "--timeout", "0.2",
                   "--yes") == 1
        assert "address 0x09: no reply to function 0x42" in capsys.readouterr().out
    assert run("pzem", "reset-energy", "/dev/serial/by-id/gone", "--address", "1", "--yes") == 1
    assert "serial:/dev/serial/by-id/gone: cannot open" in capsys.readouterr().out
    assert run("pzem", "reset-energy", "/dev/null", "--address", "0x100") == 2


def test_sniff_pzem_prints_decoded_measurements(capsys: pytest.CaptureFixture[str]) -> None:
    def make() -> PzemLine:
        line = PzemLine()
        line.add_meter(1).override = Measurement(220.0, 1.0, 220.0, 0.0, 50.0, 1.0, False)
        return line

    with emulator_thread(make) as line:
        code = run("serial", "sniff", line.path, "--driver", "pzem004t", "--count", "2",
                   "--period", "0.02", "--timeout", "0.5")
    lines = untimed(capsys.readouterr().out)
    assert code == 0
    assert lines == ["meter 0x01: 220.0 V 1.000 A 220.0 W 0 Wh 50.0 Hz PF 1.00 alarm off"] * 2


def test_sniff_pms5003_prints_frames(capsys: pytest.CaptureFixture[str]) -> None:
    def make() -> Pms5003Emulator:
        emu = Pms5003Emulator(interval_s=0.02)
        emu.fixed = PmsFrame(5, 9, 12, 4, 8, 11, (1200, 380, 70, 6, 2, 1))
        return emu

    with emulator_thread(make) as emu:
        code = run("serial", "sniff", emu.path, "--driver", "pms5003", "--count", "3")
    out = untimed(capsys.readouterr().out)
    assert code == 0
    assert out == ["PM1.0 4 PM2.5 8 PM10 11 ug/m3 (CF=1 5/9/12) counts 1200 380 70 6 2 1"] * 3


def test_sniff_emulated_radar_configured(capsys: pytest.CaptureFixture[str]) -> None:
    code = run("serial", "sniff", "emulated", "--driver", "ops243", "--configure",
               "--duration", "0.3", "--timeout", "0.5")
    # Configuration replies were consumed by the handshake; what follows is decoded. The
    # emulated road may be empty at this hour: then the command says so and fails.
    captured = capsys.readouterr()
    out = untimed(captured.out)
    assert all(line.startswith("speed ") for line in out), out
    if out:
        assert code == 0 and not captured.err
    else:
        assert code == 1 and "the radar reports only while something moves" in captured.err


def test_sniff_hex_and_json_show_the_raw_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    def make() -> Pms5003Emulator:
        emu = Pms5003Emulator(interval_s=0.02)
        emu.fixed = PmsFrame(5, 9, 12, 4, 8, 11, (1200, 380, 70, 6, 2, 1))
        return emu

    with emulator_thread(make) as emu:
        assert run("serial", "sniff", emu.path, "--driver", "pms5003", "--count", "2",
                   "--hex") == 0
        text = capsys.readouterr().out
        assert re.search(r"^  0000  42 4d 00 1c ", text, re.MULTILINE), text
        assert run("serial", "sniff", emu.path, "--driver", "pms5003", "--count", "2",
                   "--hex", "--json") == 0
        docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["frame"]["pm2_5"] for d in docs if d["frame"]] == [8, 8]
    assert "".join(d["raw"] for d in docs).count("424d001c") >= 2
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$", d["time"]) for d in docs)


def test_sniff_without_frames_says_so_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    master, slave = os.openpty()
    try:
        code = run("serial", "sniff", os.ttyname(slave), "--driver", "pms5003",
                   "--duration", "0.3")
    finally:
        os.close(master)
        os.close(slave)
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "no pms5003 frame from /dev/pts/" in captured.err and "within 0.3 s" in captured.err


def test_sniff_of_a_port_the_agent_holds_says_who(capsys: pytest.CaptureFixture[str]) -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    holder = serial.Serial(path, exclusive=True)  # as the agent's SerialPort locks it
    try:
        code = run("serial", "sniff", path, "--driver", "pms5003", "--duration", "0.3")
    finally:
        holder.close()
        os.close(master)
        os.close(slave)
    out = capsys.readouterr().out
    assert code == 1
    assert "the port is busy" in out and "edge-agent tail SENSOR" in out, out


def test_sniff_missing_port_fails_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("serial", "sniff", "/dev/serial/by-id/gone", "--driver", "pms5003",
               "--duration", "0.1") == 1
    assert "serial:/dev/serial/by-id/gone: cannot open" in capsys.readouterr().out
    assert run("serial", "sniff", "/dev/null", "--driver", "pms5003", "--duration", "0") == 2


def test_ports_lists_configured_sensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    with emulator_thread(PzemLine) as line:
        link = by_id / "usb-1a86_USB_Serial-if00-port0"
        link.symlink_to(line.device_path)
        config = tmp_path / "agent.toml"
        config.write_text(
            '[gateway]\nid = "gw-1"\n\n'
            f'[[sensors]]\nname = "meter"\ndriver = "pzem004t"\nport = "{link}"\naddress = 1\n\n'
            '[[sensors]]\nname = "radar"\ndriver = "ops243"\n'
            'port = "/dev/serial/by-id/usb-unplugged-if00"\n'
        )
        code = run("serial", "ports", "-c", str(config), "--by-id-dir", str(by_id))
        out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("PORT ")
    assert f"meter                 pzem004t   {link} -> {line.device_path}" in out
    assert "radar                 ops243     /dev/serial/by-id/usb-unplugged-if00 -> MISSING" in out

    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "gw-1"\n[[sensors]]\nname = "x"\ndriver = "nope"\n')
    assert run("serial", "ports", "-c", str(bad)) == 2
    assert "sensors[0].driver" in capsys.readouterr().out
