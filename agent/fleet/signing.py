"""ed25519 signatures over canonical JSON documents, shared by commands and artifacts.

A signed document is a JSON object ``body`` and a domain tag (``cmd``, ``model``, ``firmware``).
The signed bytes are ``b"edge-agent/" + domain + b"/1\\n"`` followed by the body as canonical
JSON (sorted keys, no whitespace, UTF-8, no NaN), so a signature made for one domain never
verifies in another, and any consumer can rebuild the bytes from the JSON it received.

The signature travels beside the body as ``{"key": KEY_ID, "alg": "ed25519", "sig": BASE64}``.
Keys are 32 raw bytes, written as standard base64; a gateway trusts every key listed in its
config (several during a rotation). Private keys are never logged, printed or sent.

``cryptography`` is imported on first use: an agent with no signed traffic does not load it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

Domain = Literal["cmd", "model", "firmware", "config"]
DOMAINS: Final[frozenset[str]] = frozenset({"cmd", "model", "firmware", "config"})
ALG: Final = "ed25519"
KEY_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Refusal = Literal["unsigned", "malformed_signature", "unknown_key", "bad_signature"]


class SignatureRefused(Exception):
    """The document is not signed by a trusted key; ``reason`` is a stable code."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason: Refusal = reason


def canonical(domain: str, body: Mapping[str, Any]) -> bytes:
    """The exact bytes a signature covers."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown signature domain {domain!r}")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return f"edge-agent/{domain}/1\n".encode() + text.encode()


def _b64decode(text: str, what: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise ValueError(f"{what} is not standard base64") from None
    if len(raw) != size:
        raise ValueError(f"{what} has {len(raw)} bytes; an ed25519 {what} has {size}")
    return raw


def public_key(text: str) -> Ed25519PublicKey:
    """A public key from its base64 text (32 raw bytes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(_b64decode(text, "public key", 32))


def public_text(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass(frozen=True)
class SigningKey:
    """A private key and the id the gateways know its public half by."""

    key_id: str
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, key_id: str) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(key_id, Ed25519PrivateKey.generate())

    @property
    def public(self) -> str:
        return public_text(self.private.public_key())

    def sign(self, domain: Domain, body: Mapping[str, Any]) -> dict[str, str]:
        sig = self.private.sign(canonical(domain, body))
        return {"key": self.key_id, "alg": ALG, "sig": base64.b64encode(sig).decode()}

    def save(self, path: Path) -> None:
        """Write the key file (mode 0600, refusing to overwrite): ``key_id`` then the seed."""
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )

        seed = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{self.key_id}\n{base64.b64encode(seed).decode()}\n")

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a key file written by ``save``; refuse one others can read."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            raise ValueError(f"{path}: not a key file")
        if st.st_mode & 0o077:
            raise ValueError(f"{path}: readable by others (mode {st.st_mode & 0o777:o}); "
                             "chmod 600 it")
        lines = path.read_text(encoding="ascii").split()
        if len(lines) != 2:
            raise ValueError(f"{path}: expected two lines, the key id and the key")
        seed = _b64decode(lines[1], "private key", 32)
        return cls(lines[0], Ed25519PrivateKey.from_private_bytes(seed))


class TrustedKeys:
    """The public keys a gateway accepts, by id."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._text = dict(keys)
        self._keys: dict[str, Ed25519PublicKey] | None = None

    def __bool__(self) -> bool:
        return bool(self._text)

    @property
    def ids(self) -> list[str]:
        return sorted(self._text)

    def _loaded(self) -> dict[str, Ed25519PublicKey]:
        if self._keys is None:
            self._keys = {k: public_key(v) for k, v in self._text.items()}
        return self._keys

    def verify(self, domain: Domain, body: Mapping[str, Any], signature: object) -> str:
        """Return the id of the key that signed ``body``; raise ``SignatureRefused`` if none."""
        from cryptography.exceptions import InvalidSignature

        if signature is None:
            raise SignatureRefused("unsigned", "the document carries no signature")
        if not isinstance(signature, dict) or set(signature) != {"key", "alg", "sig"}:
            raise SignatureRefused("malformed_signature",
                                   'a signature is {"key": ID, "alg": "ed25519", "sig": BASE64}')
        key_id, alg, sig = signature["key"], signature["alg"], signature["sig"]
        if alg != ALG or not isinstance(key_id, str) or not isinstance(sig, str):
            raise SignatureRefused("malformed_signature", f"alg must be {ALG!r}, key and sig "
                                                          "strings")
        key = self._loaded().get(key_id)
        if key is None:
            shown = key_id.encode("ascii", "backslashreplace").decode()[:64]
            raise SignatureRefused("unknown_key", f"key '{shown}' is not trusted here")
        try:
            raw = _b64decode(sig, "signature", 64)
        except ValueError as exc:
            raise SignatureRefused("malformed_signature", str(exc)) from None
        try:
            key.verify(raw, canonical(domain, body))
        except (InvalidSignature, ValueError, TypeError):
            raise SignatureRefused("bad_signature",
                                   f"the signature does not match (key {key_id!r})") from None
        return key_id
