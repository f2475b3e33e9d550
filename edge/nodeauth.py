"""Node-to-node request signatures (DESIGN.md section 3: "Node-to-node requests are signed").

An edge that forwards a player's signed URL upstream adds

    X-Nearvoice-Node: <kid>:<unix seconds>:<base64url HMAC-SHA256>

over the method and request target, under a key HKDF-derived from the keyring secret for
that purpose alone. The upstream still verifies the URL itself (signature, seal, key,
expiry); a valid node signature only vouches for the one check an edge can make and an
upstream cannot: that the player's address matched the URL's `ip` binding.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from hashlib import sha256

from edge.keyring import Keyring

NODE_HEADER = "X-Nearvoice-Node"
_DOMAIN = b"nearvoice-node-v1"
MAX_AGE = 60.0  # seconds a node signature stays valid, clock skew included


def _mac(key: bytes, method: str, target: str, stamp: str) -> bytes:
    message = b"\n".join((_DOMAIN, method.encode(), target.encode(), stamp.encode()))
    return hmac.new(key, message, sha256).digest()


def sign_node_request(keyring: Keyring, method: str, target: str, now: float | None = None) -> str:
    key = keyring.signer
    stamp = str(int(time.time() if now is None else now))
    sig = base64.urlsafe_b64encode(_mac(key.node_key, method, target, stamp)).rstrip(b"=")
    return f"{key.kid}:{stamp}:{sig.decode('ascii')}"


def verify_node_request(
    keyring: Keyring, value: str, method: str, target: str, now: float | None = None
) -> bool:
    kid, _, rest = value.partition(":")
    stamp, _, sig = rest.partition(":")
    key = keyring.get(kid)
    if key is None or not stamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > MAX_AGE:
        return False
    try:
        given = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, _mac(key.node_key, method, target, stamp))
