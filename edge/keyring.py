"""The signing keyring (docs/contracts.md#signed-urls): `NEARVOICE_KEYS="kid1:SECRET,kid2:SECRET"`.

The first key signs; every key verifies, so a new key can be rolled out everywhere before
it starts signing. Each secret is expanded with HKDF into two independent keys, one for
sealing specs (AES-256-GCM) and one for URL signatures (HMAC-SHA256), so the two uses
never share key material.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEYS_ENV = "NEARVOICE_KEYS"
MIN_SECRET_CHARS = 16
KID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_SEAL_INFO = b"nearvoice/v1/seal"
_SIGN_INFO = b"nearvoice/v1/sign"
_NODE_INFO = b"nearvoice/v1/node"


class KeyringError(ValueError):
    """The keyring configuration is unusable."""


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    sign_key: bytes = field(repr=False)
    seal: AESGCM = field(repr=False)
    node_key: bytes = field(repr=False)
    """Signs requests between nodes (edge.nodeauth)."""

    @classmethod
    def from_secret(cls, kid: str, secret: str) -> SigningKey:
        if not KID_RE.fullmatch(kid):
            raise KeyringError(f"key id {kid!r} must match {KID_RE.pattern}")
        if len(secret) < MIN_SECRET_CHARS:
            raise KeyringError(f"secret for {kid!r} is shorter than {MIN_SECRET_CHARS} chars")
        raw = secret.encode("utf-8")
        return cls(
            kid=kid,
            sign_key=_derive(raw, _SIGN_INFO),
            seal=AESGCM(_derive(raw, _SEAL_INFO)),
            node_key=_derive(raw, _NODE_INFO),
        )


class Keyring:
    """Keys by id; `signer` is the first configured key."""

    def __init__(self, keys: list[SigningKey]) -> None:
        if not keys:
            raise KeyringError(f"no signing keys: set {KEYS_ENV}=kid:secret[,kid:secret...]")
        self._by_kid = {k.kid: k for k in keys}
        if len(self._by_kid) != len(keys):
            raise KeyringError("duplicate key id in keyring")
        self.signer = keys[0]

    @classmethod
    def parse(cls, value: str) -> Keyring:
        keys = []
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            kid, sep, secret = item.partition(":")
            if not sep:
                raise KeyringError(f"keyring entry {kid!r} is not kid:secret")
            keys.append(SigningKey.from_secret(kid.strip(), secret.strip()))
        return cls(keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring:
        env = os.environ if environ is None else environ
        return cls.parse(env.get(KEYS_ENV, ""))

    def get(self, kid: str) -> SigningKey | None:
        return self._by_kid.get(kid)

    @property
    def kids(self) -> list[str]:
        return list(self._by_kid)


def generate_pair() -> str:
    """A fresh `kid:secret` entry: 6 random hex chars of id, 256 bits of secret."""
    kid = "k" + secrets.token_hex(3)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return f"{kid}:{secret}"
