"""The command envelope: signatures, gateway, expiry and ids remembered across restarts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.fleet.envelope import TIMESTAMP_PATTERN
from agent.fleet.signing import SigningKey, TrustedKeys
from agent.fleet.tool import command, timestamp
from agent.uplink.commands import STATE_CHANGING, CommandDispatcher
from agent.uplink.seen import SeenCommands

GW = "gw-env"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("ops-1")


class Activations:
    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []

    async def __call__(self, args: dict[str, Any]) -> dict[str, Any]:
        self.runs.append(args)
        return {"activated": args["name"], "run": len(self.runs)}


def dispatcher(key: SigningKey, runs: Activations, *, seen: SeenCommands | None = None,
               require: bool = True) -> CommandDispatcher:
    return CommandDispatcher({"model.activate": runs},
                             trusted=TrustedKeys({key.key_id: key.public}),
                             require_signature=require, seen=seen)


def raw(env: dict[str, Any]) -> bytes:
    return json.dumps(env).encode()


def test_model_activate_is_state_changing() -> None:
    assert "model.activate" in STATE_CHANGING and "ping" not in STATE_CHANGING


async def test_a_correctly_signed_command_runs(key: SigningKey) -> None:
    runs = Activations()
    d = dispatcher(key, runs)
    env = command("model.activate", {"name": "energy"}, gateway=GW, key=key)
    r = await d.handle(GW, "model.activate", raw(env))
    assert r.ok, r.error
    assert runs.runs == [{"name": "energy", "force": False}] and d.stats()["refused"] == {}


def _other_key() -> SigningKey:
    return SigningKey.generate("ops-1")  # same id, different key


@pytest.mark.parametrize(("case", "code"), [
    ("unsigned", "unsigned"),
    ("other_key", "bad_signature"),
    ("unknown_key_id", "unknown_key"),
    ("args_changed", "bad_signature"),
    ("name_changed", "bad_signature"),
    ("sig_not_object", "malformed_signature"),
    ("sig_bad_base64", "malformed_signature"),
    ("wrong_gateway", "wrong_gateway"),
    ("expired", "expired"),
    ("future", "issued_in_future"),
    ("signed_without_times", "invalid_request"),
    ("too_long_lived", "invalid_request"),
    ("bad_time", "invalid_request"),
    ("naive_time", "invalid_request"),
])
async def test_refusals_are_answered_with_their_reason_and_counted(
        key: SigningKey, case: str, code: str) -> None:
    runs = Activations()
    d = dispatcher(key, runs)
    name = "model.activate"
    args = {"name": "energy"}
    now = datetime.now(UTC)
    env = command(name, args, gateway=GW, key=key)
    if case == "unsigned":
        env = command(name, args, gateway=GW)
    elif case == "other_key":
        env = command(name, args, gateway=GW, key=_other_key())
    elif case == "unknown_key_id":
        env = command(name, args, gateway=GW, key=SigningKey.generate("stranger"))
    elif case == "args_changed":
        env["args"] = {"name": "energy", "force": True}
    elif case == "name_changed":
        env = command("config.get", args, gateway=GW, key=key)
    elif case == "sig_not_object":
        env["sig"] = "deadbeef"
    elif case == "sig_bad_base64":
        env["sig"] = {**env["sig"], "sig": "!!!"}
    elif case == "wrong_gateway":
        env = command(name, args, gateway="gw-other", key=key)
    elif case == "expired":
        env = command(name, args, gateway=GW, key=key, now=now - timedelta(hours=2))
    elif case == "future":
        env = command(name, args, gateway=GW, key=key, now=now + timedelta(hours=1))
    elif case == "signed_without_times":
        del env["expires_at"]
    elif case == "too_long_lived":
        env["expires_at"] = timestamp(now + timedelta(days=30))
    elif case == "bad_time":
        env["issued_at"] = "2026-13-45T99:00:00Z"
    elif case == "naive_time":
        env["issued_at"] = "2026-12-08T00:00:00"
    r = await d.handle(GW, name, raw(env))
    assert not r.ok and r.error is not None, case
    assert r.error.code == code and r.error.message
    assert runs.runs == []
    assert d.stats()["refused"] == {code: 1}


async def test_keys_are_never_in_replies_or_logs(key: SigningKey,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    d = dispatcher(key, Activations())
    env = command("model.activate", {"name": "x"}, gateway=GW, key=_other_key())
    r = await d.handle(GW, "model.activate", raw(env))
    assert r.error is not None and r.error.code == "bad_signature"
    text = r.model_dump_json() + caplog.text
    assert key.public not in text and env["sig"]["sig"] not in text


async def test_rotation_accepts_either_trusted_key(key: SigningKey) -> None:
    new = SigningKey.generate("ops-2")
    runs = Activations()
    d = CommandDispatcher({"model.activate": runs},
                          trusted=TrustedKeys({key.key_id: key.public, new.key_id: new.public}))
    for k in (key, new):
        env = command("model.activate", {"name": "m"}, gateway=GW, key=k)
        assert (await d.handle(GW, "model.activate", raw(env))).ok
    assert len(runs.runs) == 2


async def test_read_only_commands_need_no_signature_but_a_bad_one_is_refused(
        key: SigningKey) -> None:
    d = dispatcher(key, Activations())
    assert (await d.handle(GW, "ping", b'{"id": "p-1"}')).ok
    assert (await d.handle(GW, "ping", raw(command("ping", {}, gateway=GW, key=key)))).ok
    env = command("ping", {}, gateway=GW, key=_other_key())
    r = await d.handle(GW, "ping", raw(env))
    assert r.error is not None and r.error.code == "bad_signature"
    # Times and the gateway are checked on every command.
    env = command("ping", {}, gateway=GW, now=datetime.now(UTC) - timedelta(hours=2))
    r = await d.handle(GW, "ping", raw(env))
    assert r.error is not None and r.error.code == "expired"
    r = await d.handle(GW, "ping", raw(command("ping", {}, gateway="gw-other")))
    assert r.error is not None and r.error.code == "wrong_gateway"


async def test_require_signature_off_runs_unsigned_state_changes(key: SigningKey) -> None:
    runs = Activations()
    d = dispatcher(key, runs, require=False)
    r = await d.handle(GW, "model.activate", b'{"id": "u-1", "args": {"name": "m"}}')
    assert r.ok and len(runs.runs) == 1


async def test_a_default_lifetime_applies_when_only_issued_at_is_given(key: SigningKey) -> None:
    d = dispatcher(key, Activations())
    old = timestamp(datetime.now(UTC) - timedelta(hours=1, minutes=1))
    r = await d.handle(GW, "ping", raw({"id": "p-old", "issued_at": old}))
    assert r.error is not None and r.error.code == "expired"
    fresh = timestamp(datetime.now(UTC) - timedelta(minutes=59))
    assert (await d.handle(GW, "ping", raw({"id": "p-new", "issued_at": fresh}))).ok


async def test_ids_are_remembered_across_restarts(key: SigningKey, tmp_path: Path) -> None:
    runs = Activations()
    env = command("model.activate", {"name": "energy"}, gateway=GW, key=key)
    seen = SeenCommands(tmp_path / "commands.db")
    seen.open()
    first = await dispatcher(key, runs, seen=seen).handle(GW, "model.activate", raw(env))
    seen.close()
    assert first.ok
    # A new process: memory is empty, the table is not.
    seen = SeenCommands(tmp_path / "commands.db")
    seen.open()
    d = dispatcher(key, runs, seen=seen)
    again = await d.handle(GW, "model.activate", raw(env))
    assert again == first and len(runs.runs) == 1 and d.stats()["repeated"] == 1
    # An unsigned copy of the same id does not reach the stored reply.
    copy = {k: v for k, v in env.items() if k != "sig"}
    r = await d.handle(GW, "model.activate", raw(copy))
    assert r.error is not None and r.error.code == "unsigned"
    # A run cut short by a stop is not run again.
    cut = command("model.activate", {"name": "other"}, gateway=GW, key=key)
    seen.begin("model.activate", cut["id"], 2**62)
    r = await d.handle(GW, "model.activate", raw(cut))
    assert r.error is not None and r.error.code == "duplicate" and len(runs.runs) == 1
    seen.close()


async def test_a_replay_after_expiry_is_refused_even_when_remembered(
        key: SigningKey, tmp_path: Path) -> None:
    runs = Activations()
    seen = SeenCommands(tmp_path / "commands.db")
    seen.open()
    d = dispatcher(key, runs, seen=seen)
    issued = datetime.now(UTC) - timedelta(minutes=59, seconds=58)
    env = command("model.activate", {"name": "m"}, gateway=GW, key=key, now=issued,
                  lifetime_s=3600)
    assert (await d.handle(GW, "model.activate", raw(env))).ok
    stale = command("model.activate", {"name": "m"}, gateway=GW, key=key, req_id=env["id"],
                    now=issued - timedelta(seconds=5), lifetime_s=3600)
    r = await d.handle(GW, "model.activate", raw(stale))
    assert r.error is not None and r.error.code == "expired" and len(runs.runs) == 1
    seen.close()


async def test_unsigned_read_only_requests_cannot_fill_the_table(key: SigningKey,
                                                                 tmp_path: Path) -> None:
    seen = SeenCommands(tmp_path / "commands.db")
    seen.open()
    d = dispatcher(key, Activations(), seen=seen)
    for i in range(50):
        assert (await d.handle(GW, "ping", raw({"id": f"p-{i}"}))).ok
    assert len(seen) == 0
    env = command("model.activate", {"name": "m"}, gateway=GW, key=key)
    assert (await d.handle(GW, "model.activate", raw(env))).ok and len(seen) == 1
    seen.close()


def test_the_table_of_ids_is_bounded(tmp_path: Path) -> None:
    seen = SeenCommands(tmp_path / "commands.db", max_rows=100)
    seen.open()
    far = 2**62
    for i in range(300):
        seen.begin("ping", f"id-{i}", far)
    seen.begin("ping", "gone", 0)  # kept until long ago: pruned at once
    seen.prune()
    assert len(seen) == 100
    assert seen.lookup("ping", "id-299") is not None and seen.lookup("ping", "id-0") is None
    seen.close()


def test_a_damaged_table_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "commands.db"
    path.write_bytes(b"this is not sqlite" * 100)
    seen = SeenCommands(path)
    seen.open()
    seen.begin("ping", "x", 2**62)
    assert seen.lookup("ping", "x") == ("running", None)
    seen.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("commands.db.bad-")]


TIMES = st.one_of(st.none(), st.from_regex(TIMESTAMP_PATTERN, fullmatch=True),
                  st.text(max_size=50), st.integers(), st.floats())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(issued=TIMES, expires=TIMES, gateway=st.one_of(st.none(), st.just(GW), st.text()),
       sig=st.one_of(st.none(), st.text(), st.dictionaries(st.text(max_size=5),
                                                           st.text(max_size=90), max_size=4)))
async def test_any_envelope_gets_a_clear_answer_never_a_crash(
        issued: Any, expires: Any, gateway: Any, sig: Any) -> None:
    key = SigningKey.generate("k")
    runs = Activations()
    d = dispatcher(key, runs)
    env: dict[str, Any] = {"id": "h-1", "args": {"name": "m"}}
    for field, value in (("issued_at", issued), ("expires_at", expires),
                         ("gateway", gateway), ("sig", sig)):
        if value is not None:
            env[field] = value
    r = await d.handle(GW, "model.activate", json.dumps(env).encode())
    assert r.error is not None and r.error.code != "internal", r.error
    assert runs.runs == []
