"""`edge-agent fleet keygen | sign | send` against gateways on a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import stat
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import main
from agent.config.fleet import CommandsConfig
from agent.config.schema import MqttConfig, OutboxConfig
from agent.fleet.signing import SigningKey, TrustedKeys
from agent.fleet.tool import Broker, send
from agent.outbox.store import Outbox
from agent.uplink.commands import CommandDispatcher
from agent.uplink.forwarder import Uplink
from tests.broker import Mosquitto
from tests.harness import make_config, running_agent
from tests.test_uplink import running
from tests.waiting import until


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_keygen_writes_a_private_file_and_prints_the_config_entry(tmp_path: Path) -> None:
    path = tmp_path / "ops.key"
    rc, out, _ = cli(["fleet", "keygen", "--id", "ops-2027", "--out", str(path)])
    assert rc == 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = tomllib.loads(out[out.index("[[commands"):])
    cfg = CommandsConfig.model_validate(entry["commands"])
    key = SigningKey.load(path)
    assert cfg.trusted() == {"ops-2027": key.public}
    seed = path.read_text().split()[1]
    assert seed not in out
    # Never overwritten, and bad ids are refused with a clear line.
    rc, _, err = cli(["fleet", "keygen", "--id", "ops-2027", "--out", str(path)])
    assert rc == 2 and "never overwritten" in err
    rc, _, err = cli(["fleet", "keygen", "--id", "../x", "--out", str(tmp_path / "k2")])
    assert rc == 2 and "--id" in err


def test_sign_makes_envelopes_and_documents_a_gateway_accepts(tmp_path: Path) -> None:
    path = tmp_path / "ops.key"
    assert cli(["fleet", "keygen", "--id", "ops", "--out", str(path), "--json"])[0] == 0
    key = SigningKey.load(path)
    trusted = TrustedKeys({"ops": key.public})
    rc, out, _ = cli(["fleet", "sign", "--key", str(path), "model.activate", "--gateway", "gw-1",
                      "--args", '{"name": "energy"}', "--id", "c-9"])
    env = json.loads(out)
    assert rc == 0 and env["id"] == "c-9" and env["gateway"] == "gw-1"
    body = {k: env[k] for k in ("gateway", "id", "issued_at", "expires_at", "args")}
    assert trusted.verify("cmd", {**body, "name": "model.activate"}, env["sig"]) == "ops"
    doc = tmp_path / "manifest.json"
    doc.write_text(json.dumps({"name": "energy", "version": "3", "sha256": "ab" * 32}))
    rc, out, _ = cli(["fleet", "sign", "--key", str(path), "--domain", "model", str(doc)])
    signed = json.loads(out)
    assert rc == 0 and trusted.verify("model", signed["body"], signed["sig"]) == "ops"
    for bad in (['--args', '[1]'], ['--args', '{"x": NaN}'], ['--gateway', 'a b']):
        argv = ["fleet", "sign", "--key", str(path), "ping", "--gateway", "gw-1", *bad]
        rc, out, err = cli(argv)
        assert rc == 2 and out == "" and err.startswith("fleet sign: "), bad
    path.chmod(0o644)
    rc, _, err = cli(["fleet", "sign", "--key", str(path), "ping", "--gateway", "gw-1"])
    assert rc == 2 and "chmod 600" in err


class Gateways:
    """Gateways with a real Uplink and Outbox each, on one broker."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self.runs: dict[str, list[str]] = {}
        self.uplinks: dict[str, Uplink] = {}

    def handler(self, gw: str) -> Any:
        async def activate(args: dict[str, Any]) -> dict[str, Any]:
            self.runs.setdefault(gw, []).append(args["name"])
            return {"gateway": gw, "activated": args["name"]}
        return activate

    @contextlib.asynccontextmanager
    async def running(self, tmp: Path, b: Mosquitto, names: list[str]) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for gw in names:
                ob = Outbox(OutboxConfig(path=str(tmp / f"{gw}.db"), commit_interval_ms=20), gw)
                ob.open()
                stack.callback(ob.close)
                d = CommandDispatcher({"model.activate": self.handler(gw)},
                                      trusted=TrustedKeys({self.key.key_id: self.key.public}))
                up = Uplink(MqttConfig(host=b.host, port=b.port, reconnect_max_s=0.5), gw, ob, d)
                self.uplinks[gw] = up
                await stack.enter_async_context(running(ob, up))
            for up in self.uplinks.values():
                await until(lambda up=up: up.status()["state"] == "connected", 10)  # type: ignore[misc]
            yield


async def test_send_reaches_many_gateways_and_reports_the_silent_ones(
        tmp_path: Path, private_broker: Mosquitto) -> None:
    key = SigningKey.generate("ops")
    fleet = Gateways(key)
    broker = Broker(private_broker.host, private_broker.port)
    names = [f"gw-{i}" for i in range(5)]
    async with fleet.running(tmp_path, private_broker, names):
        signed = await send(broker, "edge", [*names, "gw-gone"], "model.activate",
                            {"name": "energy"}, key=key, timeout_s=5)
        unsigned = await send(broker, "edge", names[:2], "model.activate", {"name": "x"},
                              timeout_s=10)
    assert signed.missing == ["gw-gone"]
    assert {gw: r["result"] for gw, r in signed.results.items()} == {
        gw: {"gateway": gw, "activated": "energy"} for gw in names}
    assert fleet.runs == {gw: ["energy"] for gw in names}
    assert {gw: r["error"]["code"] for gw, r in unsigned.results.items()} == {
        "gw-0": "unsigned", "gw-1": "unsigned"}
    assert not unsigned.missing


async def test_send_from_the_command_line_with_json(tmp_path: Path,
                                                    private_broker: Mosquitto) -> None:
    path = tmp_path / "ops.key"
    assert cli(["fleet", "keygen", "--id", "ops", "--out", str(path)])[0] == 0
    fleet = Gateways(SigningKey.load(path))
    gws = tmp_path / "gateways.txt"
    gws.write_text("# the pilot\ngw-a\n\ngw-b\n")
    argv = ["fleet", "send", "model.activate", "--gateways-file", str(gws), "--key", str(path),
            "--args", '{"name": "traffic"}', "--port", str(private_broker.port),
            "--timeout", "10", "--json"]
    async with fleet.running(tmp_path, private_broker, ["gw-a", "gw-b"]):
        rc, out, err = await asyncio.to_thread(cli, argv)
    report = json.loads(out)
    assert rc == 0, err
    assert (report["sent"], report["ok"], report["missing"]) == (2, 2, [])
    assert fleet.runs == {"gw-a": ["traffic"], "gw-b": ["traffic"]}


async def test_a_running_agent_checks_signatures_and_counts_refusals(
        tmp_path: Path, broker: Mosquitto) -> None:
    key = SigningKey.generate("ops")
    data = make_config(tmp_path, broker.port, gateway={"id": "gw-signed"},
                       commands={"trusted_keys": [{"id": "ops", "public_key": key.public}]})
    b = Broker(broker.host, broker.port)
    async with running_agent(data) as agent:
        await until(lambda: agent.snapshot()["uplink"]["state"] == "connected", 10)
        unsigned = await send(b, "t", ["gw-signed"], "model.activate", {"name": "m"},
                              timeout_s=10)
        signed = await send(b, "t", ["gw-signed"], "model.activate", {"name": "m"}, key=key,
                            timeout_s=10)
        commands = agent.snapshot()["uplink"]["commands"]
    assert unsigned.results["gw-signed"]["error"]["code"] == "unsigned"
    # Verified, then refused by the handler itself: this agent has no model "m".
    assert signed.results["gw-signed"]["error"]["code"] == "failed"
    assert commands["refused"] == {"unsigned": 1}
    # Only the verified request spent its id; the refused one left no trace in the table.
    assert commands["trusted_keys"] == ["ops"] and commands["seen_ids"] == 1
    assert (tmp_path / "commands.db").is_file()


@pytest.mark.parametrize("argv", [
    ["fleet", "send", "ping"],
    ["fleet", "send", "ping", "--gateway", "bad/id"],
    ["fleet", "send", "ping", "--gateway", "g", "--key", "/nonexistent/key"],
    ["fleet", "send", "ping", "--gateway", "g", "--timeout", "0"],
])
def test_send_usage_errors_are_one_line(argv: list[str]) -> None:
    rc, out, err = cli(argv)
    assert rc == 2 and out == "" and err.startswith("fleet send: ") and err.count("\n") == 1


def test_a_reply_counts_only_from_the_gateway_it_was_sent_to() -> None:
    from agent.fleet.tool import Outcome, _collect

    out = Outcome(sent={"gw-1": {"id": "c-1"}, "gw-2": {"id": "c-2"}})
    ids = {"c-1": "gw-1", "c-2": "gw-2"}
    good = json.dumps({"id": "c-1", "gateway": "gw-1", "ok": True}).encode()
    _collect(out, ids, "edge/gw-2/cmd/ping/result", good)  # on another gateway's topic
    _collect(out, ids, "edge/gw-1/cmd/ping/result",
             json.dumps({"id": "c-2", "gateway": "gw-2", "ok": True}).encode())
    for junk in (b"[]", b"{", b"\xff", b"x" * 300_000):
        _collect(out, ids, "edge/gw-1/cmd/ping/result", junk)
    assert out.results == {} and out.invalid == 4
    _collect(out, ids, "edge/gw-1/cmd/ping/result", good)
    assert list(out.results) == ["gw-1"] and out.missing == ["gw-2"]


def test_send_to_a_broker_that_is_not_there_fails_with_one_line() -> None:
    from tests.broker import free_port

    rc, out, err = cli(["fleet", "send", "ping", "--gateway", "g", "--port", str(free_port()),
                        "--timeout", "2"])
    assert rc == 1 and out == "" and err.startswith("fleet send: 127.0.0.1:")
    assert err.count("\n") == 1
