"""Node-to-node request signatures (docs/contracts.md#signed-urls, `X-Nearvoice-Node`).

An edge that forwards a player's signed URL upstream adds

    X-Nearvoice-Node: v2:<kid>:<unix seconds>:<nonce>:<base64url HMAC-SHA256>

under a key HKDF-derived from the keyring secret for that purpose alone. The MAC covers
the method, the request target, the stamp, a random nonce and the *destination*: the
upstream base URL as the sender has it configured (scheme, host and port; a load balancer
in between may rewrite Host, so the Host field is not what is bound). An upstream accepts
a signature only for one of its own names (`[nodeauth] audience`, by default its listener's
URL), only within `MAX_AGE` seconds of the stamp, and only once: it remembers each nonce
until the stamp has expired (`NonceStore`, one SQLite file in the data directory shared
by the node's workers). A captured header therefore works at no other node, for no other
request, and never twice.

The upstream still verifies the URL itself (signature, seal, key, expiry); a valid node
signature only vouches for the one check an edge can make and an upstream cannot: that the
player's address matched the URL's `ip` binding.

Rolling upgrades: the first format (`<kid>:<stamp>:<sig>` over method and target alone,
replayable within its minute) is still accepted until `[nodeauth] legacy_until` (unix
seconds; 0, the default, accepts it never). Upgrade the upstream tiers first, with a
`legacy_until` covering the rollout, then the edges.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from urllib.parse import urlsplit

from nearvoice.edge.checks import at_least, http_url
from nearvoice.edge.keyring import Keyring

NODE_HEADER = "X-Nearvoice-Node"
_DOMAIN_V1 = b"nearvoice-node-v1"
_DOMAIN_V2 = b"nearvoice-node-v2"
_V2 = "v2"
MAX_AGE = 60.0  # seconds a node signature stays valid, clock skew included
NONCE_BYTES = 16  # 128 random bits: collisions are not a concern
MAX_HEADER = 256  # characters; a real header is about 110


@dataclass(frozen=True, slots=True)
class NodeAuthSettings:
    """`[nodeauth]`: how this node checks signatures from the tiers below it."""

    audience: tuple[str, ...] = ()
    """Base URLs other nodes use to reach this one (e.g. behind a load balancer); a
    signature bound to any other destination is refused. Empty: this node's listener,
    `http(s)://host:port`."""
    legacy_until: float = 0.0
    """Unix seconds until which the first, unbound signature format is still accepted,
    for a rolling upgrade; 0: never."""

    def validate(self) -> None:
        at_least(self, "legacy_until", 0)
        for base in self.audience:
            http_url("audience", base)


def destination(base: str) -> str:
    """The canonical form of an upstream base URL: lowercase scheme and host, explicit port."""
    parts = urlsplit(base.strip())
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _mac_v1(key: bytes, method: str, target: str, stamp: str) -> bytes:
    message = b"\n".join((_DOMAIN_V1, method.encode(), target.encode(), stamp.encode()))
    return hmac.new(key, message, sha256).digest()


def _mac_v2(key: bytes, method: str, dest: str, target: str, stamp: str, nonce: str) -> bytes:
    fields = (_DOMAIN_V2, method, dest, target, stamp, nonce)
    message = b"\n".join(f if isinstance(f, bytes) else f.encode() for f in fields)
    return hmac.new(key, message, sha256).digest()


def sign_node_request(
    keyring: Keyring, method: str, target: str, base: str, now: float | None = None
) -> str:
    """The header value for one request to the upstream at `base`; never reuse it."""
    key = keyring.signer
    stamp = str(int(time.time() if now is None else now))
    nonce = _b64(secrets.token_bytes(NONCE_BYTES))
    mac = _mac_v2(key.node_key, method, destination(base), target, stamp, nonce)
    return f"{_V2}:{key.kid}:{stamp}:{nonce}:{_b64(mac)}"


def sign_legacy(keyring: Keyring, method: str, target: str, now: float | None = None) -> str:
    """The first format, for tests of the transition window."""
    key = keyring.signer
    stamp = str(int(time.time() if now is None else now))
    return f"{key.kid}:{stamp}:{_b64(_mac_v1(key.node_key, method, target, stamp))}"


def _stamp_ok(stamp: str, now: float) -> bool:
    # isascii: str.isdigit accepts "²", which int() refuses.
    return stamp.isascii() and stamp.isdigit() and abs(now - int(stamp)) <= MAX_AGE


class NonceStore:
    """Nonces seen, each until its stamp expires, in one SQLite file that every worker of
    the node opens (SQLite's file locks make `INSERT` atomic across processes, so exactly
    one worker wins a replayed nonce). Without a path (tests, one worker) it is a dict.
    Node-signed requests are misses between tiers, not hits, so an insert per request
    (tens of microseconds with `synchronous=OFF`: a crash may forget nonces, and then
    only those of the last minute) is cheap next to the fetch it guards."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._memory: dict[str, float] = {}
        self._db: sqlite3.Connection | None = None
        self._purged = 0.0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
            _open_shared(db)
            self._db = db
            os.chmod(path, 0o600)

    def first_use(self, nonce: str, until: float, now: float) -> bool:
        """Records `nonce` until `until`; False when it was already recorded."""
        with self._lock:
            if self._db is None:
                if now - self._purged > MAX_AGE:
                    self._memory = {n: u for n, u in self._memory.items() if u > now}
                    self._purged = now
                if nonce in self._memory:
                    return False
                self._memory[nonce] = until
                return True
            try:
                if now - self._purged > MAX_AGE:
                    self._db.execute("DELETE FROM nonces WHERE until < ?", (now,))
                    self._purged = now
                self._db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, until))
            except sqlite3.IntegrityError:
                return False
            except sqlite3.OperationalError:
                return False  # locked past the timeout: refuse rather than risk a replay
            return True

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


OPEN_SECONDS = 10.0
"""How long a worker opening the nonce file keeps trying while the others open it too."""


def _open_shared(db: sqlite3.Connection) -> None:
    """WAL, no fsync, and the table, on a file that every worker opens at once when a node
    starts. Switching the journal to WAL takes the file exclusively, and SQLite answers a
    second opener "database is locked" at once rather than through its busy timeout
    while the first one is switching or recovering, so the opening is retried until
    OPEN_SECONDS. The mode is stored in the file: only its first opener switches it."""
    deadline = time.monotonic() + OPEN_SECONDS
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, until REAL)")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class NodeVerifier:
    """Checks `X-Nearvoice-Node` values for one node (see the module docstring)."""

    def __init__(
        self,
        keyring: Keyring,
        audience: tuple[str, ...],
        nonces: NonceStore,
        legacy_until: float = 0.0,
    ) -> None:
        self.keyring = keyring
        self.audience = tuple(dict.fromkeys(destination(a) for a in audience))
        """Names other nodes reach this one by, besides the socket's own address."""
        self.nonces = nonces
        self.legacy_until = legacy_until

    def verify(
        self,
        value: str,
        method: str,
        target: str,
        now: float | None = None,
        local: tuple[str, ...] = (),
    ) -> bool:
        """Whether `value` signs this request to this node, for the first time. `local`
        adds the names of the socket the request arrived on (`local_names`)."""
        current = time.time() if now is None else now
        if len(value) > MAX_HEADER:
            return False
        parts = value.split(":")
        if len(parts) == 3:
            return current < self.legacy_until and self._verify_v1(parts, method, target, current)
        if len(parts) != 5 or parts[0] != _V2:
            return False
        _, kid, stamp, nonce, sig = parts
        key = self.keyring.get(kid)
        given = _unb64(sig)
        if key is None or given is None or not nonce or not _stamp_ok(stamp, current):
            return False
        if not any(
            hmac.compare_digest(given, _mac_v2(key.node_key, method, dest, target, stamp, nonce))
            for dest in (*self.audience, *local)
        ):
            return False
        return self.nonces.first_use(nonce, int(stamp) + MAX_AGE, current)

    def _verify_v1(self, parts: list[str], method: str, target: str, now: float) -> bool:
        kid, stamp, sig = parts
        key = self.keyring.get(kid)
        given = _unb64(sig)
        if key is None or given is None or not _stamp_ok(stamp, now):
            return False
        return hmac.compare_digest(given, _mac_v1(key.node_key, method, target, stamp))


def own_audience(scheme: str, host: str, port: int) -> tuple[str, ...]:
    """A node's default audience: its listener's URL, and the loopback names when it
    listens on every address."""
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 (naming the wildcard, not binding it)
        hosts = ["127.0.0.1", "localhost", "[::1]"]
    elif host == "127.0.0.1":
        hosts = ["127.0.0.1", "localhost"]
    else:
        hosts = [f"[{host}]" if ":" in host else host]
    return tuple(f"{scheme}://{h}:{port}" for h in hosts)


def local_names(scheme: str, sockname: object) -> tuple[str, ...]:
    """The destinations a request that arrived on a socket bound to `sockname` may have
    been signed for: that address and port, and `localhost` for a loopback one."""
    if not isinstance(sockname, list | tuple) or len(sockname) < 2:
        return ()
    host, port = str(sockname[0]), int(sockname[1])
    names = [f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"]
    if host in ("127.0.0.1", "::1"):
        names.append(f"{scheme}://localhost:{port}")
    return tuple(names)
