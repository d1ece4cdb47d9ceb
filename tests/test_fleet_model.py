"""model.deploy on the gateway's side: chunks on disk, the signed artifact, the versioned install,
the shadow start, the skill gate, and the state that survives a restart.

The inference stage is the real one (onnxruntime), the commands go through the real dispatcher,
and the cloud side is ``deploy_model`` talking to that dispatcher in-process (the broker runs in
tests/test_fleet_model_agent.py). Models are the small "next = current + offset" graphs of
tests/test_shadow.py, on its ramp: exact for one offset, so which one wins is known.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.config.load import parse_config
from agent.config.schema import AgentConfig
from agent.fleet.deploy_client import (
    DeployInterrupted,
    begin_args,
    deploy_many,
    deploy_model,
    plain_envelope,
    signed_envelope,
)
from agent.fleet.model_deploy import ModelDeployments
from agent.fleet.signing import SignatureRefused, SigningKey, TrustedKeys
from agent.pipeline.infer import InferenceStage
from agent.uplink.commands import CommandDispatcher
from tests.test_shadow import SLOPE_W, offset_model, ramp
from tests.waiting import until

GW = "gw-test"
KEY = SigningKey.generate("ops-1")  # the operator's key every test gateway trusts


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return KEY


def config(tmp: Path, key: SigningKey, active: Path, gateway: str = GW,
           **deploy: Any) -> AgentConfig:
    return parse_config({
        "gateway": {"id": gateway},
        "outbox": {"path": str(tmp / "state" / "outbox.db")},
        "sensors": [{"name": "meter", "driver": "synthetic", "enabled": False}],
        "streams": [{"name": "cabinet", "sensors": ["meter"], "window_s": 60}],
        "models": [{"name": "energy", "stream": "cabinet", "path": str(active),
                    "activate_min_s": 3600}],
        "commands": {"require_signature": True,
                     "trusted_keys": [{"id": key.key_id, "public_key": key.public}]},
        "model_deploy": deploy,
    })


class Gateway:
    """One gateway's deploy side: a real stage, real dispatcher, its state under ``tmp``."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.stage = InferenceStage()
        self.dep = ModelDeployments(cfg, self.stage)
        assert self.stage.reload(self.dep.configs()) == []
        # This dispatcher holds no keys: what these tests check is the artifact's signature.
        # A dispatcher that checks command signatures is told they are not required here.
        off = ({"require_signature": False} if "require_signature"
               in inspect.signature(CommandDispatcher).parameters else {})
        self.commands = CommandDispatcher(self.dep.handlers(), **off)
        self.sent = 0
        self.cut_after: int | None = None  # lose the connection after this many chunks
        self.commit_timeout_s: float | None = None  # the dispatcher's limit for commits

    async def request(self, gateway: str, name: str, args: dict[str, Any],
                      timeout_s: float) -> dict[str, Any]:
        if args.get("op") == "chunk":
            if self.cut_after is not None and self.sent >= self.cut_after:
                raise DeployInterrupted("connection lost (test)")
            self.sent += 1
        payload = json.dumps(plain_envelope(gateway, name,
                                            f"r{self.sent}-{os.urandom(4).hex()}", args))
        limit = self.commands.timeout_s
        if args.get("op") == "commit" and self.commit_timeout_s is not None:
            self.commands.timeout_s = self.commit_timeout_s
        try:
            reply = await self.commands.handle(gateway, name, payload.encode())
        finally:
            self.commands.timeout_s = limit
        return json.loads(reply.model_dump_json(by_alias=True))

    async def play(self, minutes: int, start: int = 0) -> None:
        for k in range(start, start + minutes):
            await self.stage.on_window(ramp(k))
            self.dep.after_window()

    def close(self) -> None:
        self.stage.close()


def files(model: Path) -> tuple[Path, Path]:
    return model, model.with_suffix(".json")


async def test_a_signed_deploy_resumes_after_an_interruption_and_starts_in_shadow(
        tmp_path: Path, key: SigningKey) -> None:
    active = offset_model(tmp_path, 100.0, "active")
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    cfg = config(tmp_path, key, active)
    gw = Gateway(cfg)
    try:
        gw.cut_after = 4
        with pytest.raises(DeployInterrupted):
            await deploy_model(gw, GW, *files(cand), key, chunk_size=256, in_flight=1)
        # The gateway restarts: a new stage and store over the same disk.
        gw.close()
        gw = Gateway(cfg)
        result = await deploy_model(gw, GW, *files(cand), key, chunk_size=256)
        assert result.chunks > 10
        assert result.ok, result.error
        assert result.sent == result.chunks - 4  # only what was missing
        assert result.state == "shadow"
        version = result.version
        installed = tmp_path / "state" / "models" / "energy" / version / "energy.onnx"
        assert installed.read_bytes() == cand.read_bytes()
        info = gw.stage.candidate("energy")
        assert info is not None and info[0] == installed
        assert not (tmp_path / "state" / "deploys" / result.deploy_id).exists()
        # The same deploy again is answered from what runs, with nothing sent.
        again = await deploy_model(gw, GW, *files(cand), key)
        assert again.ok and again.state == "shadow" and again.sent == 0
    finally:
        gw.close()


async def test_the_gate_activates_a_better_candidate_only_and_it_survives_a_restart(
        tmp_path: Path, key: SigningKey) -> None:
    active = offset_model(tmp_path, 100.0, "active")  # poor at this site (overshoots)
    worse = offset_model(tmp_path, 200.0, "worse")
    better = offset_model(tmp_path, SLOPE_W, "better")  # exact on the ramp
    cfg = config(tmp_path, key, active)
    gw = Gateway(cfg)
    try:
        first = gw.stage.versions()["energy"]
        assert (await deploy_model(gw, GW, *files(worse), key)).state == "shadow"
        await gw.play(180)
        assert gw.stage.versions()["energy"] == first
        info = gw.stage.candidate("energy")
        assert info is not None and info[1] is not None and not info[1].ok
        assert "does not beat" in info[1].reason

        result = await deploy_model(gw, GW, *files(better), key)
        assert result.ok and result.state == "shadow"
        await gw.play(180, start=180)
        assert gw.stage.versions()["energy"] == result.version[:12]
        assert gw.stage.candidate("energy") is None
        assert gw.dep.status()["activated"] == 1
        # The worse version is on no path any more: deleted; the first is kept for rollback.
        folder = tmp_path / "state" / "models" / "energy"
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [result.version]
    finally:
        gw.close()

    gw = Gateway(cfg)  # a restart
    try:
        assert gw.stage.versions()["energy"] == result.version[:12]
        reply = await gw.request(GW, "model.rollback", {"name": "energy"}, 10)
        assert reply["ok"], reply
        assert gw.stage.versions()["energy"] == first
    finally:
        gw.close()
    gw = Gateway(cfg)
    try:
        assert gw.stage.versions()["energy"] == first  # the rollback survived too
        reply = await gw.request(GW, "model.rollback", {"name": "energy"}, 10)
        assert not reply["ok"] and "no previous version" in reply["error"]["message"]
    finally:
        gw.close()


async def test_force_activates_at_once_and_manual_waits(tmp_path: Path,
                                                        key: SigningKey) -> None:
    active = offset_model(tmp_path, 100.0, "active")
    worse = offset_model(tmp_path, 200.0, "worse")
    gw = Gateway(config(tmp_path, key, active))
    try:
        result = await deploy_model(gw, GW, *files(worse), key, activate="manual")
        assert result.state == "shadow"
        await gw.play(180)
        assert gw.stage.candidate("energy") is not None  # it lost: still in shadow
        with pytest.raises(ValueError, match="refused"):
            gw.dep.activate("energy", force=False)
        assert gw.dep.activate("energy", force=True)
        assert gw.stage.versions()["energy"] == result.version[:12]
    finally:
        gw.close()


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "unsigned"), ("other_key", "unknown_key"), ("impostor", "bad_signature"),
    ("tampered", "bad_signature"),
    ("other_gateway", "wrong_gateway"), ("malformed", "malformed_signature")])
async def test_an_artifact_not_signed_for_this_gateway_is_refused_before_a_byte_is_stored(
        tmp_path: Path, key: SigningKey, case: str, reason: str) -> None:
    active = offset_model(tmp_path, 100.0, "active")
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    gw = Gateway(config(tmp_path, key, active))
    onnx, manifest = cand.read_bytes(), cand.with_suffix(".json").read_bytes()
    signer = {"other_key": SigningKey.generate("intruder"),
              "impostor": SigningKey.generate(key.key_id)}.get(case, key)
    args = begin_args(None if case == "unsigned" else signer, name="energy", version="v2",
                      onnx=onnx, manifest=manifest,
                      target="gw-other" if case == "other_gateway" else GW, deploy_id="d1")
    if case == "tampered":
        args["size"] += 1
    if case == "malformed":
        args["sig"] = {"key": key.key_id, "alg": "ed25519", "sig": "not base64!"}
    try:
        reply = await gw.request(GW, "model.deploy", args, 10)
        assert not reply["ok"] and reply["error"]["message"].startswith(reason), reply
        assert gw.dep.status()["refused"] == {reason: 1}
        assert not (tmp_path / "state" / "deploys" / "d1").exists()
    finally:
        gw.close()


async def test_a_model_whose_manifest_does_not_match_is_not_installed(
        tmp_path: Path, key: SigningKey) -> None:
    active = offset_model(tmp_path, 100.0, "active")
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    doc = json.loads(cand.with_suffix(".json").read_text())
    doc["inputs"] = doc["inputs"][1:]  # the graph has one input name more
    cand.with_suffix(".json").write_text(json.dumps(doc))
    gw = Gateway(config(tmp_path, key, active))
    try:
        result = await deploy_model(gw, GW, *files(cand), key)
        assert not result.ok and result.error is not None
        assert "commit" in result.error and "refused" in result.error
        assert gw.stage.candidate("energy") is None
        assert not (tmp_path / "state" / "models" / "energy").exists() or not any(
            p.name != ".installing" for p in (tmp_path / "state" / "models" / "energy").iterdir())
    finally:
        gw.close()


@pytest.mark.parametrize("args, fragment", [
    ({"op": "chunk", "deploy_id": "d", "index": 0, "sha256": "0" * 64, "data": "%%%"},
     "data"),
    ({"op": "chunk", "deploy_id": "../etc", "index": 0, "sha256": "0" * 64, "data": ""},
     "deploy_id"),
    ({"op": "chunk", "deploy_id": "d", "index": 10**30, "sha256": "0" * 64, "data": ""},
     "index"),
    ({"op": "begin", "deploy_id": "d", "name": "energy", "version": "../../x",
      "sha256": "0" * 64, "size": 1, "manifest_sha256": "0" * 64, "manifest_size": 1},
     "version"),
    ({"op": "chunk", "deploy_id": "d", "index": True, "sha256": "0" * 64, "data": ""},
     "index"),
    ({"op": "begin", "deploy_id": "d", "name": "energy", "version": "v1",
      "sha256": "0" * 64, "size": 2.0, "manifest_sha256": "0" * 64, "manifest_size": 1},
     "size"),
    ({"op": "launch", "deploy_id": "d"}, "op"),
    ({"op": "commit", "deploy_id": "d", "activate": "yes"}, "activate"),
])
async def test_hostile_deploy_args_are_refused_by_name(tmp_path: Path, key: SigningKey,
                                                       args: dict[str, Any],
                                                       fragment: str) -> None:
    gw = Gateway(config(tmp_path, key, offset_model(tmp_path, 1.0, "a")))
    try:
        reply = await gw.request(GW, "model.deploy", args, 10)
        assert reply["error"]["code"] == "bad_args" and fragment in reply["error"]["message"]
    finally:
        gw.close()


def test_the_chunk_payload_fits_a_command(key: SigningKey) -> None:
    from agent.fleet.model_args import MAX_CHUNK
    from agent.uplink.commands import MAX_COMMAND_BYTES

    data = os.urandom(MAX_CHUNK)
    payload = json.dumps({"id": "x" * 128, "args": {
        "op": "chunk", "deploy_id": "d" * 64, "index": 2**32,
        "sha256": hashlib.sha256(data).hexdigest(),
        "data": base64.b64encode(data).decode()}})
    # Room left for the signed envelope (gateway, times, signature) around it.
    assert len(payload) + 600 < MAX_COMMAND_BYTES


async def test_one_signed_artifact_deploys_to_many_gateways_with_results_per_gateway(
        tmp_path: Path, key: SigningKey) -> None:
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    fleet = {gw: Gateway(config(tmp_path / gw, key, offset_model(tmp_path, 100.0, "a"), gw))
             for gw in ("gw-1", "gw-2", "gw-3")}

    class Router:
        async def request(self, gateway: str, name: str, args: dict[str, Any],
                          timeout_s: float) -> dict[str, Any]:
            return await fleet[gateway].request(gateway, name, args, timeout_s)

    try:
        results = await deploy_many(Router(), list(fleet), *files(cand), key, concurrency=2)
        assert list(results) == list(fleet)
        assert all(r.ok and r.state == "shadow" for r in results.values()), results
        assert all(g.stage.candidate("energy") is not None for g in fleet.values())
    finally:
        for g in fleet.values():
            g.close()


def test_the_signed_envelope_covers_gateway_name_id_times_and_args(key: SigningKey) -> None:
    args = {"op": "status", "deploy_id": "d1"}
    req = json.loads(json.dumps(signed_envelope(key, 60)(GW, "model.deploy", "c-1", args)))
    body = {k: req[k] for k in ("gateway", "id", "issued_at", "expires_at", "args")}
    trusted = TrustedKeys({key.key_id: key.public})
    assert trusted.verify("cmd", {**body, "name": "model.deploy"}, req["sig"]) == key.key_id
    assert req["expires_at"] > req["issued_at"] and req["issued_at"].endswith("Z")
    with pytest.raises(SignatureRefused, match="does not match"):
        trusted.verify("cmd", {**body, "name": "model.rollback"}, req["sig"])


async def test_a_deploy_with_more_missing_chunks_than_a_reply_lists_takes_several_rounds(
        tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.fleet.model_deploy

    monkeypatch.setattr(agent.fleet.model_deploy, "MISSING_LISTED", 5)
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    gw = Gateway(config(tmp_path, key, offset_model(tmp_path, 100.0, "a")))
    try:
        result = await deploy_model(gw, GW, *files(cand), key, chunk_size=256)
        assert result.ok and result.state == "shadow", result.error
        assert result.chunks > 10 and result.sent == result.chunks
    finally:
        gw.close()


async def test_a_full_disk_fails_the_chunk_with_a_reason_and_the_deploy_resumes_after(
        tmp_path: Path, key: SigningKey) -> None:
    from tests.test_chaos import small_tmpfs

    cand = offset_model(tmp_path, SLOPE_W, "cand")
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        gw = Gateway(config(disk, key, offset_model(tmp_path, 100.0, "a")))
        filler = disk / "filler"
        try:
            with open(filler, "wb") as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            result = await deploy_model(gw, GW, *files(cand), key, chunk_size=256)
            assert not result.ok and result.error is not None
            assert "cannot write its disk" in result.error, result.error
            filler.unlink()
            result = await deploy_model(gw, GW, *files(cand), key, chunk_size=256)
            assert result.ok and result.state == "shadow", result.error
        finally:
            gw.close()


@pytest.mark.parametrize("limit_s", [0.0005, 0.005, 0.05])
async def test_a_commit_that_runs_out_of_time_is_completed_by_a_repeat(
        tmp_path: Path, key: SigningKey, limit_s: float) -> None:
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    gw = Gateway(config(tmp_path, key, offset_model(tmp_path, 100.0, "a")))
    try:
        gw.commit_timeout_s = limit_s  # cut off wherever the commit happens to be
        first = await deploy_model(gw, GW, *files(cand), key)
        assert first.ok or (first.error is not None and "timeout" in first.error), first
        gw.commit_timeout_s = None
        result = await deploy_model(gw, GW, *files(cand), key)
        assert result.ok and result.state == "shadow", result.error
        info = gw.stage.candidate("energy")
        assert info is not None and info[0].parent.name == result.version
        folder = tmp_path / "state" / "models" / "energy"
        # No leftovers, once the cut-off attempts' threads have finished.
        await until(lambda: [p.name for p in folder.iterdir()] == [result.version], 10,
                    "only the installed version in its folder")
    finally:
        gw.close()


async def test_a_partial_deploy_that_expired_while_the_agent_was_down_is_deleted_at_start(
        tmp_path: Path, key: SigningKey) -> None:
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    cfg = config(tmp_path, key, offset_model(tmp_path, 100.0, "a"), partial_expire_s=3600)
    gw = Gateway(cfg)
    gw.cut_after = 2
    with pytest.raises(DeployInterrupted):  # one in flight: no chunk still being stored
        await deploy_model(gw, GW, *files(cand), key, chunk_size=256, in_flight=1)
    gw.close()
    partial = next((tmp_path / "state" / "deploys").iterdir())
    day_ago = partial.stat().st_mtime - 86_400
    os.utime(partial / "header.json", (day_ago, day_ago))
    gw = Gateway(cfg)  # the agent comes back a day later
    try:
        assert not partial.exists() and gw.dep.status()["expired"] == 1
    finally:
        gw.close()


@pytest.mark.parametrize("reply", [
    {"count": "12", "missing": []}, {"count": 3, "missing": [7]}, {"count": 3, "missing": "0"},
    {"count": 3, "missing": [0], "missing_count": -1}, {"count": True, "missing": []}])
async def test_a_gateway_answering_nonsense_fails_its_own_deploy_only(
        tmp_path: Path, key: SigningKey, reply: dict[str, Any]) -> None:
    cand = offset_model(tmp_path, SLOPE_W, "cand")
    good = Gateway(config(tmp_path / "good", key, offset_model(tmp_path, 100.0, "a"), "gw-1"))

    class Liar:
        async def request(self, gateway: str, name: str, args: dict[str, Any],
                          timeout_s: float) -> dict[str, Any]:
            if gateway == "gw-1":
                return await good.request(gateway, name, args, timeout_s)
            return {"ok": True, "result": reply, "id": "x", "gateway": gateway}

    try:
        results = await deploy_many(Liar(), ["gw-1", "gw-liar"], *files(cand), key)
        assert results["gw-1"].ok, results["gw-1"].error
        liar = results["gw-liar"]
        assert not liar.ok and liar.error is not None and "reply" in liar.error, liar
    finally:
        good.close()
