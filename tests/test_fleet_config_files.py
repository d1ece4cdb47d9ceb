"""The pieces of a config deployment: what changed, the health criteria, the record on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.config_files import (
    MAX_CHANGED_KEYS,
    DeployRecord,
    changed,
    load_record,
    save_record,
    trial_problems,
    write_atomic,
)


def test_changed_names_sections_and_key_paths() -> None:
    old = {"gateway": {"id": "a"}, "sensors": [{"name": "x", "port": "/dev/a"}],
           "streams": [{"sensors": ["x"]}], "mqtt": {"host": "h", "port": 1883}}
    new = {"gateway": {"id": "a"}, "sensors": [{"name": "x", "port": "/dev/b"}],
           "streams": [{"sensors": ["x", "y"]}], "mqtt": {"host": "h", "port": 1883},
           "web": {"port": 8080}}
    c = changed(old, new)
    assert c.sections == ["sensors", "streams", "web"]
    assert c.keys == ["sensors[0].port", "streams[0].sensors", "web"]
    assert c.count == 3
    assert changed(old, old).count == 0


def test_changed_lists_a_bounded_number_of_keys_and_counts_all() -> None:
    old: dict[str, Any] = {"runtime": {f"k{i:03d}": i for i in range(200)}}
    new: dict[str, Any] = {"runtime": {f"k{i:03d}": i + 1 for i in range(200)}}
    c = changed(old, new)
    assert c.count == 200 and len(c.keys) == MAX_CHANGED_KEYS
    assert c.keys[0] == "runtime.k000"


def healthy() -> dict[str, Any]:
    return {"sensors": [{"name": "a", "state": "up"}], "uplink": {"state": "connected"},
            "pipeline": {"heartbeat_age_s": 0.1, "errors": {}}}


def test_trial_problems_name_each_unmet_criterion() -> None:
    assert trial_problems(healthy()) == []
    snap = healthy()
    snap["sensors"].append({"name": "radar", "state": "backoff",
                            "last_error": "could not open port"})
    snap["uplink"] = {"state": "connecting"}
    snap["pipeline"] = {"heartbeat_age_s": 9.5, "errors": {"process": 2}}
    assert trial_problems(snap) == [
        "sensor radar: backoff (could not open port)", "uplink: connecting",
        "pipeline: no progress for 9.5 s", "pipeline: stage failures process 2"]
    assert "pipeline: not running" in trial_problems({})


def record() -> DeployRecord:
    return DeployRecord(deployment="cfg-1", state="trial", sha256="a" * 64,
                        previous_sha256="b" * 64, timeout_s=30, started_ts=1.7e9)


def test_the_record_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml.deploy.json"
    save_record(path, record())
    assert load_record(path) == record()
    assert load_record(tmp_path / "none.json") is None


@pytest.mark.parametrize("content", [
    b"", b"\xff\xfe", b"{" * 20_000, b'{"deployment": 1e999}', b"[]",
    b'{"deployment": "x", "state": "trial", "sha256": "' + b"9" * 5000 + b'"}',
    b'{"state": "exploded"}', b"x" * 200_000,
])
def test_a_damaged_record_is_ignored_not_fatal(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "agent.toml.deploy.json"
    path.write_bytes(content)
    assert load_record(path) is None
    assert path.read_bytes() == content  # kept for inspection


def test_a_record_that_is_not_a_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml.deploy.json"
    os.mkfifo(path)
    assert load_record(path) is None  # would block forever if it were opened for reading


def test_write_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    write_atomic(path, b"one", 0o600)
    write_atomic(path, b"two", 0o600)
    assert path.read_bytes() == b"two" and oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]
