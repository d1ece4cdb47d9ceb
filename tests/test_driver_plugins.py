"""Driver plugins: the example package pip-installed (offline, into a directory of its own put
on sys.path), its options checked by its own model, its readings in the MQTT feed of a real
broker; a plugin that fails to import is reported and stops nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import main
from agent.feed.raw_batch import readings_of
from drivers import plugins
from tests.broker import Mosquitto
from tests.harness import feed_of, make_config, running_agent, until, write_toml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugin"
BROKEN_DRIVER = 'raise ImportError("needs the vendor SDK libfoo, which is not installed")\n'


def _broken_package(where: Path) -> Path:
    src = where / "broken"
    (src / "edge_agent_broken").mkdir(parents=True)
    (src / "edge_agent_broken" / "__init__.py").write_text('"""A plugin that cannot load."""\n')
    (src / "edge_agent_broken" / "driver.py").write_text(BROKEN_DRIVER)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=70.1"]\n'
        'build-backend = "setuptools.build_meta"\n'
        '[project]\nname = "edge-agent-broken"\nversion = "0.0.1"\n'
        '[project.entry-points."edge_agent.drivers"]\nbroken = "edge_agent_broken.driver"\n'
        '[tool.setuptools]\npackages = ["edge_agent_broken"]\n')
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both plugins installed by pip into a target directory, without touching the venv and
    without the network (no index, no build isolation: the venv's setuptools builds them)."""
    work = tmp_path_factory.mktemp("plugins")
    example = work / "hello"
    shutil.copytree(EXAMPLE, example)  # builds write egg-info beside the sources
    target = work / "site"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(example),
         str(_broken_package(work))],
        capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(target.glob("edge_agent_hello-0.1.0.dist-info"))
    return target


@pytest.fixture
def on_path(installed: Path) -> Iterator[Path]:
    sys.path.insert(0, str(installed))
    plugins.discover(refresh=True)
    try:
        yield installed
    finally:
        sys.path.remove(str(installed))
        for name in [m for m in sys.modules if m.startswith(("edge_agent_hello",
                                                               "edge_agent_broken"))]:
            del sys.modules[name]
        plugins.discover(refresh=True)


def test_sensors_drivers_lists_plugins_with_their_origin(
        on_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sensors", "drivers", "--json"]) == 1  # one plugin failed
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["hello"]["origin"] == "plugin edge-agent-hello 0.1.0"
    assert rows["hello"]["kind"] == "virtual" and "counter" in rows["hello"]["description"]
    assert rows["modbus"]["origin"] == "built-in"
    assert "libfoo" in rows["broken"]["error"] and "edge-agent-broken 0.0.1" in \
        rows["broken"]["error"]
    main(["sensors", "drivers"])
    out = capsys.readouterr().out
    assert "FAILED" in out and "plugin edge-agent-hello 0.1.0" in out


def test_plugin_options_are_validated_by_its_own_model(
        on_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[gateway]\nid = "gw"\n[[sensors]]\nname = "c"\ndriver = "hello"\n'
                   'options = { step = -1, colour = "red" }\n'
                   '[[sensors]]\nname = "b"\ndriver = "broken"\n')
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "sensors[0]" in err and "options.step" in err and "options.colour" in err
    assert "sensors[1]" not in err  # a plugin that cannot load does not make the file invalid
    cfg.write_text('[gateway]\nid = "gw"\n[[sensors]]\nname = "b"\ndriver = "broken"\n')
    assert main(["config", "check", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "warning: sensors[0] (b)" in err and "libfoo" in err
    cfg.write_text('[gateway]\nid = "gw"\n[[sensors]]\nname = "c"\ndriver = "hello"\n'
                   'options = { step = 2.5 }\n')
    assert main(["config", "check", str(cfg)]) == 0


async def test_plugin_readings_reach_the_feed_and_a_broken_one_stops_nothing(
        on_path: Path, tmp_path: Path, broker: Mosquitto) -> None:
    data = make_config(
        tmp_path, broker.port,
        sensors=[{"name": "counter", "driver": "hello", "period_s": 0.1,
                  "options": {"step": 2.5}},
                 {"name": "vendor", "driver": "broken", "period_s": 0.1},
                 {"name": "other", "driver": "synthetic", "period_s": 0.1}],
        streams=[{"name": "s", "sensors": ["counter", "vendor", "other"], "window_s": 1,
                  "share": "raw"}])
    write_toml(tmp_path / "agent.toml", data)  # the file form parses too
    async with feed_of(broker.port, "t/gw-test/raw/#", "plugin-feed") as raw:
        async with running_agent(data) as agent:
            def readings() -> list[dict[str, Any]]:
                return [r for m in raw for r in readings_of(m)]

            def counted() -> list[float]:
                return [d["value"] for d in readings() if d["sensor"] == "counter"]

            await until(lambda: len(counted()) >= 5, 20, "plugin readings in the feed")
            await until(lambda: sum(d["sensor"] == "other" for d in readings()) >= 5, 20,
                        "the other sensor's readings")
            sups = {s.health.name: s.health for s in agent.pipeline.supervisors}  # type: ignore[union-attr]
            await until(lambda: sups["vendor"].failures >= 1, 10, "the broken plugin reported")
        values = counted()
        assert values[:3] == [2.5, 5.0, 7.5]
        assert all(d["unit"] == "count" for d in readings() if d["sensor"] == "counter")
        assert "libfoo" in sups["vendor"].last_error
        assert sups["counter"].failures == 0 and sups["other"].failures == 0
