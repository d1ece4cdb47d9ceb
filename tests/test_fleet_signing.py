"""The shared signature format: domain separation, key rotation, hostile signatures."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.fleet import CommandsConfig
from agent.fleet.signing import SignatureRefused, SigningKey, TrustedKeys, canonical

BODY = {"gateway": "gw-1", "name": "config.apply", "id": "c-1", "args": {"x": [1, 2.5, "é"]}}


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("ops-2026")


def test_signed_body_verifies_and_names_its_key(key: SigningKey) -> None:
    trusted = TrustedKeys({"ops-2026": key.public})
    assert trusted.verify("cmd", BODY, key.sign("cmd", BODY)) == "ops-2026"


def test_the_signature_covers_the_canonical_bytes_an_independent_verifier_sees(
        key: SigningKey) -> None:
    sig = key.sign("cmd", BODY)
    pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(key.public))
    # Key order in the sender's dict must not matter; the bytes are rebuilt from the JSON.
    reordered = dict(reversed(list(BODY.items())))
    pub.verify(base64.b64decode(sig["sig"]), canonical("cmd", reordered))
    assert canonical("cmd", BODY).startswith(b"edge-agent/cmd/1\n{")


def test_a_signature_for_one_domain_does_not_verify_in_another(key: SigningKey) -> None:
    trusted = TrustedKeys({"ops-2026": key.public})
    with pytest.raises(SignatureRefused) as e:
        trusted.verify("firmware", BODY, key.sign("cmd", BODY))
    assert e.value.reason == "bad_signature"


def test_rotation_old_and_new_key_both_verify_while_listed(key: SigningKey) -> None:
    new = SigningKey.generate("ops-2027")
    trusted = TrustedKeys({"ops-2026": key.public, "ops-2027": new.public})
    assert trusted.verify("model", BODY, new.sign("model", BODY)) == "ops-2027"
    assert trusted.verify("model", BODY, key.sign("model", BODY)) == "ops-2026"
    only_new = TrustedKeys({"ops-2027": new.public})
    with pytest.raises(SignatureRefused) as e:
        only_new.verify("model", BODY, key.sign("model", BODY))
    assert e.value.reason == "unknown_key"


def test_a_changed_body_or_a_key_posing_under_a_trusted_id_is_refused(key: SigningKey) -> None:
    trusted = TrustedKeys({"ops-2026": key.public})
    sig = key.sign("cmd", BODY)
    with pytest.raises(SignatureRefused) as e:
        trusted.verify("cmd", {**BODY, "gateway": "gw-2"}, sig)
    assert e.value.reason == "bad_signature"
    attacker = SigningKey.generate("ops-2026")
    with pytest.raises(SignatureRefused) as e:
        trusted.verify("cmd", BODY, attacker.sign("cmd", BODY))
    assert e.value.reason == "bad_signature"


@pytest.mark.parametrize(("sig", "reason"), [
    (None, "unsigned"),
    ("AAAA", "malformed_signature"),
    ({"key": "ops-2026", "alg": "rsa", "sig": "AAAA"}, "malformed_signature"),
    ({"key": "ops-2026", "alg": "ed25519", "sig": "not base64!"}, "malformed_signature"),
    ({"key": "ops-2026", "alg": "ed25519", "sig": base64.b64encode(b"x" * 63).decode()},
     "malformed_signature"),
    ({"key": "ops-2026", "alg": "ed25519", "sig": "é"}, "malformed_signature"),
    ({"key": 7, "alg": "ed25519", "sig": "AAAA"}, "malformed_signature"),
    ({"key": "ops-2026", "alg": "ed25519", "sig": "AAAA", "extra": 1}, "malformed_signature"),
    ({"key": "\udcff" * 500, "alg": "ed25519", "sig": "AAAA"}, "unknown_key"),
])
def test_hostile_signatures_get_a_stable_reason(key: SigningKey, sig: object,
                                                reason: str) -> None:
    trusted = TrustedKeys({"ops-2026": key.public})
    with pytest.raises(SignatureRefused) as e:
        trusted.verify("cmd", BODY, sig)
    assert e.value.reason == reason
    assert len(str(e.value)) < 200


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                       max_size=3),
                    max_leaves=8))
def test_any_signature_shape_is_refused_with_a_reason_never_an_exception(sig: object) -> None:
    trusted = TrustedKeys({"k": SigningKey.generate("k").public})
    with pytest.raises(SignatureRefused):
        trusted.verify("cmd", BODY, sig)


def test_key_file_round_trip_is_private_and_refuses_overwrite(tmp_path: Path,
                                                              key: SigningKey) -> None:
    path = tmp_path / "ops.key"
    key.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    back = SigningKey.load(path)
    assert back.key_id == "ops-2026" and back.public == key.public
    with pytest.raises(FileExistsError):
        key.save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        SigningKey.load(path)


def test_config_rejects_bad_keys_and_duplicate_ids(key: SigningKey) -> None:
    ok = CommandsConfig.model_validate({"trusted_keys": [{"id": "a", "public_key": key.public}]})
    assert ok.require_signature and ok.trusted() == {"a": key.public}
    with pytest.raises(ValueError, match="public_key"):
        CommandsConfig.model_validate({"trusted_keys": [{"id": "a", "public_key": "abc"}]})
    with pytest.raises(ValueError, match="listed twice"):
        CommandsConfig.model_validate({"trusted_keys": [
            {"id": "a", "public_key": key.public}, {"id": "a", "public_key": key.public}]})
