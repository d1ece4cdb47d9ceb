"""``edge-agent i2c scan``: the i2cdetect-style grid and chip identification."""

from __future__ import annotations

import argparse

import pytest

from drivers.emulated.ads1115 import Ads1115Emulator
from drivers.emulated.bme280 import Bme280Emulator
from drivers.emulated.i2c_bus import EmulatedI2CBus
from drivers.emulated.ina219 import Ina219Emulator
from drivers.i2c import cli
from drivers.i2c.scan import render_grid, scan


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent")
    cli.register(p.add_subparsers(dest="command", required=True))
    return p


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    args = parser().parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_scan_emulated_shows_all_three_chips(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["i2c", "scan", "--bus", "emulated"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "i2c-emulated:"
    assert lines[1] == "     0  1  2  3  4  5  6  7  8  9  a  b  c  d  e  f"
    assert lines[2] == "00:                         -- -- -- -- -- -- -- --"
    assert lines[6] == "40: 40 -- -- -- -- -- -- -- 48 -- -- -- -- -- -- --"
    assert lines[9] == "70: -- -- -- -- -- -- 76 --"
    assert "0x40  ina219    config 0x399F (power-on value)" in lines
    assert "0x48  ads1115   thresholds 0x8000/0x7FFF (power-on values)" in lines
    assert "0x76  bme280    chip id 0x60: BME280" in lines


def test_scan_only_moves_register_pointers() -> None:
    bus = EmulatedI2CBus()
    bus.attach(0x76, Bme280Emulator())
    bus.attach(0x41, Ina219Emulator())
    bus.attach(0x49, Ads1115Emulator())
    found = scan(bus)
    assert [(f.address, f.chip) for f in found] == [
        (0x41, "ina219"), (0x49, "ads1115"), (0x76, "bme280")]
    for entry in bus.log:
        op = entry[0]
        assert op in ("write_quick", "read_byte", "read_byte_data", "i2c_rdwr"), entry
        if op == "i2c_rdwr":
            assert all(m[0] == "r" or len(m[2]) == 1 for m in entry[1:]), entry


def test_configured_and_foreign_chips() -> None:
    bus = EmulatedI2CBus()
    ina = bus.attach(0x44, Ina219Emulator())
    bus.write_i2c_block_data(0x44, 0x00, [0x01, 0x9F])  # a configured INA219
    bus.attach(0x77, Bme280Emulator(chip_id=0x58))
    bus.attach(0x50, Ina219Emulator())  # an EEPROM's address: probed by a read, not a write
    found = {f.address: f for f in scan(bus)}
    assert found[0x44].chip == "ina219?"
    assert "config 0x019F" in found[0x44].detail
    assert isinstance(ina, Ina219Emulator) and ina.config == 0x019F  # untouched by the scan
    assert found[0x77].chip == ""
    assert found[0x77].detail == "chip id 0x58: BMP280"
    assert found[0x50].chip == ""
    assert ("read_byte", 0x50) in bus.log
    assert ("write_quick", 0x50) not in bus.log
    grid = render_grid(found.values())
    assert "40: -- -- -- -- 44 --" in grid
    assert "50: 50 --" in grid


def test_scan_needs_a_bus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["i2c", "scan"], capsys)
    assert code == 2
    assert "no bus given: use --bus N" in out
    assert "or --bus emulated" in out


def test_scan_missing_adapter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["i2c", "scan", "--bus", "250"], capsys)
    assert code == 1
    assert out.strip() == ("i2c scan: i2c-250: /dev/i2c-250 does not exist "
                           "(I2C not enabled, or adapter not loaded?)")


def test_scan_bad_bus_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["i2c", "scan", "--bus", "one"])
    assert exc.value.code == 2
    assert "'one' is not a bus number or 'emulated'" in capsys.readouterr().err
