"""`nearvoice sign --realtime --tenant NAME --voice V [--ttl S] [--base URL]`: prints one
`ws(s)://…/v1/realtime/speech?token=…` URL for a browser session (docs/contracts.md#command-line).
The token is signed with the keyring's signing key (NEARVOICE_KEYS), like a URL, so any
node of the tier accepts it."""

from __future__ import annotations

import time
from urllib.parse import urlencode, urlsplit

from nearvoice.edge.apikeys import TENANT_RE
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.realtime import tokens
from nearvoice.edge.voices import Voice

REALTIME_PATH = "/v1/realtime/speech"


def websocket_base(base: str) -> str:
    """`http(s)://host` as `ws(s)://host`; a ws(s) base is kept."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"--base must be an http(s) or ws(s) URL, not {base!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def realtime_url(keyring: Keyring, base: str, tenant: str, voice: Voice, ttl: int) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"--tenant must match {TENANT_RE.pattern}")
    if ttl <= 0:
        raise ValueError("--ttl must be positive")
    token = tokens.SessionToken(tenant, voice.name, int(time.time()) + ttl)
    query = urlencode({"token": tokens.encode(keyring, token)})
    return f"{websocket_base(base)}{REALTIME_PATH}?{query}"
