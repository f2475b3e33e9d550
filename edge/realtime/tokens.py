"""Session tokens for browsers (docs/contracts.md#realtime-speech): a browser cannot set
headers on a WebSocket, so the application's backend mints a short-lived token with its API key
(`POST /v1/realtime/tokens`) and the page connects with `?token=`.

    token = kid "." base64url(payload) "." base64url(HMAC-SHA256(k, domain, kid, payload))
    payload = canonical JSON {"e": expiry (unix s), "t": tenant, "v": voice}

`k` is derived with HKDF from the key id's URL-signing key (edge.keyring), under its own
label, so a session token can never pass for a signed URL or a node signature, nor the
reverse. The MAC covers the key id and every field and is compared in constant time
(`hmac.compare_digest`), before any field is read: a tampered token is refused without
its payload being parsed. Answers before the upgrade are those of signed URLs (section
3): 403 for a token that does not verify, 410 once it has expired.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nearvoice.edge.errors import Forbidden, Gone
from nearvoice.edge.keyring import Keyring, SigningKey

_DOMAIN = b"nearvoice-realtime-v1"
_INFO = b"nearvoice/v1/realtime"
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True, slots=True)
class SessionToken:
    tenant: str
    voice: str
    expires: int


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64e(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def _key(signing: SigningKey) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        signing.sign_key
    )


def _mac(signing: SigningKey, payload: str) -> bytes:
    message = b"\n".join((_DOMAIN, signing.kid.encode("ascii"), payload.encode("ascii")))
    return hmac.new(_key(signing), message, sha256).digest()


def encode(keyring: Keyring, token: SessionToken) -> str:
    signing = keyring.signer
    fields = {"e": token.expires, "t": token.tenant, "v": token.voice}
    payload = _b64e(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    return f"{signing.kid}.{payload}.{_b64e(_mac(signing, payload))}"


def verify(keyring: Keyring, text: str, *, now: float, skew: float) -> SessionToken:
    """The token's fields, or 403 (`bad_token`, `unknown_kid`, `bad_signature`) or 410
    (`expired`)."""
    if len(text) > MAX_TOKEN_CHARS or text.count(".") < 2:
        raise Forbidden("bad_token", "malformed session token")
    kid, payload, sig = text.rsplit(".", 2)
    signing = keyring.get(kid)
    if signing is None:
        raise Forbidden("unknown_kid", "session token is signed with an unknown key id")
    try:
        given = _b64d(sig)
        payload.encode("ascii")
    except (binascii.Error, ValueError, UnicodeEncodeError):
        given = b""
    if not given or not hmac.compare_digest(given, _mac(signing, payload)):
        raise Forbidden("bad_signature", "session token signature does not match")
    try:
        fields = json.loads(_b64d(payload))
        token = SessionToken(str(fields["t"]), str(fields["v"]), int(fields["e"]))
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise Forbidden("bad_token", "malformed session token") from exc
    if now > token.expires + skew:
        raise Gone("expired", "session token has expired")
    return token
