"""Malformed profiles and points exit 2 naming file, point and key; the technician commands
``modbus scan``, ``modbus read``, ``profiles list`` and ``profiles show``."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.main import main
from drivers.emulated.modbus import ModbusRtuLine
from drivers.modbus.decode import encode
from drivers.modbus.options import resolve
from drivers.modbus.profile import SHIPPED_DIR, load_profile_file

GOOD_POINT = 'quantity = "voltage"\naddress = 0\ntype = "f32"\nunit = "V"\n'


def profile_text(points: str, head: str = "") -> str:
    return (f'name = "bad"\ndocument = "a test"\ntable = "input"\n{head}\n'
            f'[[points]]\n{GOOD_POINT}\n[[points]]\n{points}')


BAD = {
    "unknown type": ('quantity = "current"\naddress = 6\ntype = "u17"\nunit = "A"\n',
                     "", "points[1] (current)", "key type", "'u17' is not a type"),
    "overlapping registers": ('quantity = "current"\naddress = 1\ntype = "f32"\nunit = "A"\n',
                              "", "points[1] (current)", "key address", "overlaps"),
    "count over 125": ('quantity = "current"\naddress = 6\ntype = "f32"\nunit = "A"\n',
                       "max_registers = 200", "", "key max_registers", "125"),
    "unknown unit": ('quantity = "current"\naddress = 6\ntype = "f32"\nunit = "furlong"\n',
                     "", "points[1] (current)", "key unit", "'furlong' is not a known unit"),
    "a point bigger than a request": ('quantity = "current"\naddress = 6\ntype = "f64"\n',
                                      "max_registers = 2", "points[1] (current)", "key type",
                                      "more than max_registers"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_profile_exits_2_naming_file_point_and_key(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    points, head, point, key, reason = BAD[case]
    site = tmp_path / "profiles"
    site.mkdir()
    (site / "bad.toml").write_text(profile_text(points, head))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[gateway]\nid = "gw"\n[[sensors]]\nname = "m"\ndriver = "modbus"\n'
                   f'port = "/dev/ttyUSB0"\naddress = 1\n'
                   f'options = {{ profile = "bad", profiles_dir = "{site}" }}\n')
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    for part in (str(site / "bad.toml"), point, key, reason, "sensors[0]"):
        assert part in err, (part, err)
    assert main(["profiles", "show", "bad", "--dir", str(site)]) == 2
    err = capsys.readouterr().err
    assert str(site / "bad.toml") in err and key in err and point in err


def test_inline_points_are_checked_the_same_way(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[gateway]\nid = "gw"\n[[sensors]]\nname = "m"\ndriver = "modbus"\n'
                   'port = "tcp://127.0.0.1:1502"\naddress = 3\n'
                   '[[sensors.options.points]]\nquantity = "a"\naddress = 0\ntype = "u32"\n'
                   '[[sensors.options.points]]\nquantity = "b"\naddress = 1\ntype = "i64"\n'
                   'unit = "kWh"\n')
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "sensors[0]" in err and "points[1] (b)" in err and "key address" in err


@pytest.mark.parametrize("junk", [b"\xff\xfe not utf-8", b"name = [", b"x" * (2 << 20)])
def test_hostile_profile_files_are_refused_cleanly(tmp_path: Path, junk: bytes) -> None:
    f = tmp_path / "junk.toml"
    f.write_bytes(junk)
    with pytest.raises(ValueError, match=str(f)):
        load_profile_file(f)


def test_every_shipped_profile_loads_and_cites_its_document() -> None:
    files = sorted(SHIPPED_DIR.glob("*.toml"))
    assert {f.stem for f in files} >= {"eastron-sdm120", "eastron-sdm630", "pzem-004t-v3"}
    for f in files:
        loaded = load_profile_file(f)
        assert loaded.profile.name == f.stem
        assert len(loaded.profile.document) > 20


def test_profiles_list_and_show_as_json(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    assert main(["profiles", "list", "--json", "--dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"eastron-sdm630"}
    assert main(["profiles", "show", "eastron-sdm630", "--json", "--dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["requests"][0] == {"table": "input", "start": 0, "count": 36}
    assert all(r["count"] <= 60 for r in doc["requests"])


@pytest.fixture
def line() -> Iterator[ModbusRtuLine]:
    """An emulated line served from its own event loop thread, as a real bus would be."""
    spec = resolve({"profile": "eastron-sdm630"})
    pzem = resolve({"profile": "pzem-004t-v3"})
    dev = ModbusRtuLine("cli-line")
    dev.add_unit(2, spec.points)
    dev.add_unit(17, pzem.points)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(dev.start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert started.wait(5)
    yield dev
    asyncio.run_coroutine_threadsafe(dev.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    loop.close()


def test_scan_finds_the_units_on_the_line(line: ModbusRtuLine,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["modbus", "scan", line.path, "--units", "1-20", "--table", "input",
               "--timeout", "0.05"])
    out = capsys.readouterr()
    assert rc == 0
    assert "unit   2" in out.out and "unit  17" in out.out and "2 of 20" in out.out
    assert "20/20" in out.err  # the progress bar
    assert main(["modbus", "scan", line.path, "--units", "1-3", "--table", "input",
                 "--timeout", "0.05", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [f["unit"] for f in doc["found"]] == [2]


def test_read_decodes_a_block_every_way(line: ModbusRtuLine,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    unit = line.units[2]
    volts = unit.points[0]
    unit.set(volts, 231.5)
    assert [unit.images["input"][a] for a in (0, 1)] == encode(231.5, "f32", "ABCD")
    assert main(["modbus", "read", line.path, "--unit", "2", "--address", "0", "--count", "4",
                 "--table", "input", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decoded"]["f32"]["ABCD"][0] == 231.5
    assert set(doc["decoded"]["f32"]) == {"ABCD", "CDAB", "BADC", "DCBA"}
    assert doc["decoded"]["u64"]["ABCD"][1] is None or len(doc["registers"]) == 4
    assert main(["modbus", "read", line.path, "--unit", "2", "--address", "0", "--count", "4",
                 "--table", "input"]) == 0
    assert "231.5" in capsys.readouterr().out
    assert main(["modbus", "read", line.path, "--unit", "2", "--address", "0",
                 "--count", "126"]) == 2
    assert main(["modbus", "read", line.path, "--unit", "9", "--address", "0", "--count", "2",
                 "--timeout", "0.05"]) == 1


def test_profile_points_carry_cleaning_defaults_the_sensor_can_override(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.config.cleaning import resolve as policy
    from agent.config.load import load_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[gateway]\nid = "gw"\n[[sensors]]\nname = "m"\ndriver = "modbus"\n'
                   'port = "/dev/ttyUSB0"\naddress = 1\n'
                   f'options = {{ profile = "eastron-sdm630", profiles_dir = "{tmp_path}" }}\n'
                   '[sensors.clean.active_power]\nmax = 50000.0\n')
    s = load_config(cfg).sensor("m")
    total = policy("active_power", 1.0, s.clean["active_power"])
    assert (total.min, total.max) == (-70000.0, 50000.0)  # profile's min, sensor's max
    assert policy("power_factor_l2", 1.0, s.clean.get("power_factor_l2")).min == -1.0
    assert policy("voltage_l1", 1.0, s.clean.get("voltage_l1")).max == 300.0  # as `voltage`
    (tmp_path / "bad.toml").write_text(profile_text(
        'quantity = "current"\naddress = 6\ntype = "f32"\nunit = "A"\n'
        'clean = { min = 5.0, max = 1.0, colour = 1.0 }\n'))
    cfg.write_text('[gateway]\nid = "gw"\n[[sensors]]\nname = "m"\ndriver = "modbus"\n'
                   'port = "/dev/ttyUSB0"\naddress = 1\n'
                   f'options = {{ profile = "bad", profiles_dir = "{tmp_path}" }}\n')
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "bad.toml") in err and "point current" in err
    assert "key clean.colour" in err
