"""Partial deploys and the model state on disk: resumable, bounded, and read as hostile input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.fleet.chunks import ChunkStore, DeployError, DeployHeader
from agent.fleet.model_state import ModelState
from agent.fleet.signing import SigningKey
from tests.test_fleet_model import KEY, config
from tests.test_shadow import offset_model


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return KEY


def header(data: bytes, deploy_id: str = "d1", chunk: int = 256) -> DeployHeader:
    return DeployHeader(deploy_id, "energy", "v1", hashlib.sha256(data[:-10]).hexdigest(),
                        len(data) - 10, hashlib.sha256(data[-10:]).hexdigest(), 10, chunk, "*")


def put(store: ChunkStore, h: DeployHeader, data: bytes, i: int) -> None:
    part = data[i * h.chunk_size:(i + 1) * h.chunk_size]
    store.put(h.deploy_id, i, hashlib.sha256(part).hexdigest(), part)


def test_chunks_survive_a_new_store_and_assemble_checked(tmp_path: Path) -> None:
    data = os.urandom(1000)
    h = header(data)
    store = ChunkStore(tmp_path, 10_000, 3600)
    assert store.begin(h) == [0, 1, 2, 3]
    put(store, h, data, 2)
    put(store, h, data, 2)  # a repeat is harmless
    store = ChunkStore(tmp_path, 10_000, 3600)  # a restart
    assert store.begin(h) == [0, 1, 3]
    for i in (0, 1, 3):
        put(store, h, data, i)
    got, onnx, manifest = store.assemble("d1")
    assert got == h and onnx + manifest == data


def test_hostile_chunks_are_refused_and_nothing_stored_is_lost(tmp_path: Path) -> None:
    data = os.urandom(1000)
    h = header(data)
    store = ChunkStore(tmp_path, 10_000, 3600)
    store.begin(h)
    put(store, h, data, 0)
    part = data[256:512]
    for index, sha, body, why in (
            (1, hashlib.sha256(b"x").hexdigest(), part, "sha256"),
            (1, hashlib.sha256(part[:-1]).hexdigest(), part[:-1], "bytes"),
            (9, hashlib.sha256(part).hexdigest(), part, "outside"),
            (-1, hashlib.sha256(part).hexdigest(), part, "outside")):
        with pytest.raises(DeployError, match=why):
            store.put("d1", index, sha, body)
    with pytest.raises(DeployError, match="in progress"):
        store.put("nope", 0, hashlib.sha256(part).hexdigest(), part)
    with pytest.raises(DeployError, match="another artifact"):
        store.begin(header(os.urandom(1000)))
    with pytest.raises(DeployError, match="lacks 3 of 4"):
        store.assemble("d1")
    assert store.missing("d1") == [1, 2, 3]


def test_size_expiry_and_the_number_of_partial_deploys_are_bounded(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = ChunkStore(tmp_path, 2000, 600, clock=lambda: now[0])
    with pytest.raises(DeployError, match="at most 2000"):
        store.begin(header(os.urandom(3000)))
    store.begin(header(os.urandom(100), "a"))
    store.begin(header(os.urandom(100), "b"))
    store.begin(header(os.urandom(100), "c"))  # room made: the least recently touched goes
    assert sorted(store.status()["in_progress"]) == ["b", "c"] and store.evicted == 1
    now[0] = os.stat(tmp_path / "c" / "header.json").st_mtime + 601
    assert sorted(store.sweep()) == ["b", "c"] and not any(tmp_path.iterdir())


@pytest.mark.parametrize("damage", [b"", b"{", b"[]", b'{"deploy_id": 1}', b"\xff\xfe" * 9,
                                    b'{"a":' * 200 + b"1" + b"}" * 200])
def test_a_damaged_header_on_disk_drops_its_deploy_only(tmp_path: Path,
                                                        damage: bytes) -> None:
    store = ChunkStore(tmp_path, 10_000, 3600)
    data = os.urandom(500)
    store.begin(header(data, "good"))
    store.begin(header(data, "bad"))
    (tmp_path / "bad" / "header.json").write_bytes(damage)
    assert store.header("bad") is None and not (tmp_path / "bad").exists()
    assert store.missing("good") == [0, 1]


@pytest.mark.parametrize("damage", [b"not json", b'{"models": []}',
                                    b'{"models": {"energy": {"base": 1}}}', b"\x00" * 10])
def test_a_damaged_state_file_is_set_aside_and_the_configured_models_run(
        tmp_path: Path, key: SigningKey, damage: bytes) -> None:
    cfg = config(tmp_path, key, offset_model(tmp_path, 1.0, "a"))
    root = tmp_path / "state" / "models"
    root.mkdir(parents=True)
    (root / "state.json").write_bytes(damage)
    state = ModelState(root)
    assert state.load_error is not None and state.entries == {}
    assert state.configs(cfg.models) == list(cfg.models)
    assert (root / "state.json.damaged").read_bytes() == damage


def test_a_technicians_config_edit_takes_precedence_over_the_state(tmp_path: Path,
                                                                  key: SigningKey) -> None:
    a, b = offset_model(tmp_path, 1.0, "a"), offset_model(tmp_path, 2.0, "b")
    cfg = config(tmp_path, key, a)
    state = ModelState(tmp_path / "m")
    state.activated(cfg.models[0], str(b))
    assert ModelState(tmp_path / "m").configs(cfg.models)[0].path == str(b)
    edited = config(tmp_path, key, tmp_path / "elsewhere.onnx")
    assert ModelState(tmp_path / "m").configs(edited.models) == list(edited.models)


def test_a_chunk_changed_on_disk_fails_the_whole_check_and_the_deploy_starts_over(
        tmp_path: Path) -> None:
    data = os.urandom(1000)
    h = header(data)
    store = ChunkStore(tmp_path, 10_000, 3600)
    store.begin(h)
    for i in range(4):
        put(store, h, data, i)
    (tmp_path / "d1" / "000001.chunk").write_bytes(os.urandom(256))
    with pytest.raises(DeployError, match="ONNX file does not match its sha256; its chunks"):
        store.assemble("d1")
    assert store.begin(h) == [0, 1, 2, 3]


def test_a_deployed_file_deleted_behind_the_agents_back_falls_back_to_the_config(
        tmp_path: Path, key: SigningKey) -> None:
    a, b = offset_model(tmp_path, 1.0, "a"), offset_model(tmp_path, 2.0, "b")
    cfg = config(tmp_path, key, a)
    state = ModelState(tmp_path / "m")
    state.activated(cfg.models[0], str(b))
    assert ModelState(tmp_path / "m").configs(cfg.models)[0].path == str(b)
    b.unlink()
    assert ModelState(tmp_path / "m").configs(cfg.models) == list(cfg.models)
