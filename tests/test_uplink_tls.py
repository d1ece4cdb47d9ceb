"""TLS to a real mosquitto with certificates made here: verification, mutual TLS, refusals."""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.config.schema import MqttConfig
from agent.feed.messages import health_message
from agent.uplink.tls import UplinkConfigError, read_credentials, tls_context
from tests.broker import Mosquitto, free_port
from tests.test_uplink import GW, broker_at, make, running, subscribed, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\nauthorityKeyIdentifier=keyid\n"
                                   "subjectKeyIdentifier=hash\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                             "keyUsage=critical,digitalSignature")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature")
    return d


def tls_broker(path: Path, pki: Path, *, require_cert: bool) -> Mosquitto:
    port = free_port()
    return broker_at(path, port=port, listeners=(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        f"require_certificate {'true' if require_cert else 'false'}\n"))


def sub_tls(pki: Path, client: bool = False) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return {"tls_context": ctx}


async def test_server_verification_and_delivery(tmp_path: Path, pki: Path) -> None:
    b = tls_broker(tmp_path / "m", pki, require_cert=False)
    try:
        cfg = MqttConfig(host=b.host, port=b.port, tls=True, ca_file=str(pki / "ca.pem"),
                         reconnect_max_s=0.5)
        ob, up = make(tmp_path, cfg)
        async with subscribed(b.host, b.port, **sub_tls(pki)) as sub, running(ob, up):
            seqs = [ob.put("health", "health", health_message(GW, {"i": i})) for i in range(10)]
            await wait_until(lambda: len(sub.seqs()) >= 10)
            st = up.status()
        assert sorted(sub.seqs()) == seqs
        assert st["tls"] is True and st["nodelay"] is True and st["connects"] == 1
        ob.close()
    finally:
        b.stop()


async def test_mutual_tls(tmp_path: Path, pki: Path) -> None:
    b = tls_broker(tmp_path / "m", pki, require_cert=True)
    try:
        base: dict[str, Any] = {"host": b.host, "port": b.port, "tls": True,
                                "ca_file": str(pki / "ca.pem"), "reconnect_max_s": 0.5}
        ob, up = make(tmp_path, MqttConfig(**base, cert_file=str(pki / "client.pem"),
                                           key_file=str(pki / "client.key")))
        async with subscribed(b.host, b.port, **sub_tls(pki, client=True)) as sub, \
                running(ob, up):
            seq = ob.put("health", "health", health_message(GW, {"i": 1}))
            await wait_until(lambda: sub.seqs() == [seq])
        ob.close()
        # The same broker without a client certificate: refused, nothing delivered.
        ob2, anon = make(tmp_path / "anon", MqttConfig(**base))
        async with running(ob2, anon):
            ob2.put("health", "health", health_message(GW, {"i": 2}))
            await wait_until(lambda: anon.status()["connect_failures"] >= 2, 15)
            st = anon.status()
        assert st["connects"] == 0 and st["acked"] == 0
        assert "TLS failed" in st["last_error"] and "certificate required" in st["last_error"]
        ob2.close()
    finally:
        b.stop()


async def test_wrong_ca_is_refused_clearly_and_never_falls_back(
        tmp_path: Path, pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = tls_broker(tmp_path / "m", pki, require_cert=False)
    try:
        cfg = MqttConfig(host=b.host, port=b.port, tls=True, ca_file=str(pki / "other-ca.pem"),
                         reconnect_max_s=0.3)
        ob, up = make(tmp_path, cfg)
        async with subscribed(b.host, b.port, **sub_tls(pki)) as sub, running(ob, up):
            ob.put("health", "health", health_message(GW, {"i": 1}))
            await wait_until(lambda: up.status()["connect_failures"] >= 3)
            st = up.status()
            assert not sub.seqs()
        assert st["connects"] == 0 and st["state"] in ("connecting", "waiting")
        assert "certificate" in st["last_error"] and "other-ca.pem" in st["last_error"]
        assert ob.stats()["rows"] == 1  # still held for when the trust problem is fixed
        errors = [r for r in caplog.records if r.name == "agent.uplink.forwarder"]
        assert errors and all(r.levelno == logging.ERROR for r in errors)
        assert len(errors) == 1  # the same failure, repeated, is logged once
        ob.close()
    finally:
        b.stop()


async def test_tls_client_never_speaks_plaintext_to_a_plain_listener(tmp_path: Path,
                                                                     pki: Path) -> None:
    plain = broker_at(tmp_path / "plain")
    try:
        cfg = MqttConfig(host=plain.host, port=plain.port, tls=True,
                         ca_file=str(pki / "ca.pem"), reconnect_max_s=0.3)
        ob, up = make(tmp_path, cfg)
        async with subscribed(plain.host, plain.port) as sub, running(ob, up):
            ob.put("health", "health", health_message(GW, {"i": 1}))
            await wait_until(lambda: up.status()["connect_failures"] >= 2)
            assert up.status()["connects"] == 0
            assert "TLS handshake failed" in up.status()["last_error"]
            assert not sub.seqs()
        ob.close()
    finally:
        plain.stop()


async def test_host_name_is_verified(tmp_path: Path, pki: Path) -> None:
    b = tls_broker(tmp_path / "m", pki, require_cert=False)
    try:
        # The certificate names 127.0.0.1 only; "localhost" reaches the same broker.
        cfg = MqttConfig(host="localhost", port=b.port, tls=True, ca_file=str(pki / "ca.pem"),
                         reconnect_max_s=0.3)
        ob, up = make(tmp_path, cfg)
        async with running(ob, up):
            await wait_until(lambda: up.status()["connect_failures"] >= 2)
        st = up.status()
        assert st["connects"] == 0 and "certificate" in st["last_error"]
        ob.close()
    finally:
        b.stop()


def test_tls_settings_are_checked(tmp_path: Path, pki: Path) -> None:
    remote = MqttConfig(host="broker.example.net", port=8883)
    ctx = tls_context(remote)  # TLS is on by default away from loopback
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert tls_context(MqttConfig(host="127.0.0.1")) is None
    with pytest.raises(UplinkConfigError, match="plaintext"):
        tls_context(MqttConfig.model_construct(host="broker.example.net", tls=False))
    with pytest.raises(UplinkConfigError, match=r"ca_file.*no such file"):
        tls_context(MqttConfig(host="broker.example.net", ca_file=str(tmp_path / "nope.pem")))
    with pytest.raises(UplinkConfigError, match="cert_file"):
        tls_context(MqttConfig(host="broker.example.net", cert_file=str(pki / "ca.key"),
                               key_file=str(pki / "client.key")))
    creds = tmp_path / "c"
    creds.write_text("user\npa ss\n")
    assert read_credentials(str(creds)) == ("user", "pa ss")
    assert read_credentials("") is None
    creds.write_text("\n")
    with pytest.raises(UplinkConfigError, match="user name"):
        read_credentials(str(creds))

