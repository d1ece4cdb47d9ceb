"""TLS context and broker credentials for the uplink.

TLS is on by default for any broker that is not on loopback (``MqttConfig.tls_enabled``). The
context always verifies the server's certificate chain and host name; nothing here can turn
that off, and a failed handshake is an error, never a reason to try plaintext. Credentials come
from a file (two lines: user name, password) and are never logged.
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from typing import Any

from agent.config.base import is_loopback
from agent.config.schema import MqttConfig


class UplinkConfigError(Exception):
    """A TLS or credentials setting cannot be used; the message names the file and the reason."""


class ClientContext(ssl.SSLContext):
    """A client context that remembers the sockets it wrapped.

    paho leaves the socket of a failed handshake open; ``close_wrapped`` closes it.
    """

    wrapped: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        if not hasattr(self, "wrapped"):
            self.wrapped = []
        self.wrapped.append(sock)
        return sock

    def close_wrapped(self) -> None:
        for sock in getattr(self, "wrapped", []):
            with contextlib.suppress(OSError):
                sock.close()
        self.wrapped = []

    def forget_wrapped(self) -> None:
        self.wrapped = []


def tls_context(cfg: MqttConfig) -> ClientContext | None:
    """A verifying client context, or None when TLS is off for this (loopback) broker."""
    if not cfg.tls_enabled():
        remote = [h for h, _ in cfg.addresses() if not is_loopback(h)]
        if remote:
            raise UplinkConfigError(
                f"mqtt.tls: plaintext is refused for {remote[0]}, which is not on loopback")
        return None
    # What ssl.create_default_context(SERVER_AUTH) sets up: certificate and host name checks.
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if cfg.ca_file:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except FileNotFoundError:
        raise UplinkConfigError(f"mqtt.ca_file: {cfg.ca_file}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise UplinkConfigError(f"mqtt.ca_file: {cfg.ca_file}: not usable: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ctx.verify_mode != ssl.CERT_REQUIRED or not ctx.check_hostname:
        raise UplinkConfigError("the TLS context does not verify the server")  # defensive
    if cfg.cert_file or cfg.key_file:
        if not (cfg.cert_file and cfg.key_file):
            raise UplinkConfigError("mqtt.cert_file and mqtt.key_file must be given together")
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        except FileNotFoundError as exc:
            raise UplinkConfigError(
                f"mqtt.cert_file/key_file: {exc.filename or cfg.cert_file}: no such file") from None
        except (OSError, ssl.SSLError) as exc:
            raise UplinkConfigError(
                f"mqtt.cert_file/key_file: {cfg.cert_file}, {cfg.key_file}: "
                f"not a usable certificate and key ({type(exc).__name__})") from None
    return ctx


def read_credentials(path: str) -> tuple[str, str | None] | None:
    """(user name, password) from a two-line file; None when no file is configured."""
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UplinkConfigError(f"mqtt.credentials_file: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UplinkConfigError(
            f"mqtt.credentials_file: {path}: unreadable ({type(exc).__name__})") from None
    user = lines[0].strip() if lines else ""
    if not user:
        raise UplinkConfigError(
            f"mqtt.credentials_file: {path}: the first line (user name) is empty")
    password = lines[1].rstrip("\r\n") if len(lines) > 1 else None
    return user, password
