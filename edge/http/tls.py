"""TLS for a node: the server context, its reload on SIGHUP, and the client context a
node uses to reach its upstream tier.

A node on the open internet terminates TLS itself (HTTP/1.1 over TLS, RFC 9112 section
9.3 and RFC 8446): `[tls] cert` and `key` are PEM files, `client_ca` optionally asks every
client for a certificate from that CA (mutual TLS, e.g. a shield that only edges may
reach). Certificates are renewed without a restart: on SIGHUP `reload` loads the files
again into the live `SSLContext`; `load_cert_chain` on a context applies to the handshakes
that follow, so connections already open keep their session and new ones get the new
chain. A reload that fails (a half-written file) keeps the old chain and says why.

Node-to-node: `[upstream] ca` verifies the upstream's certificate against that CA instead
of the system store; `[upstream] cert`/`key` present this node's own certificate (mutual
TLS between tiers); `[upstream] require_tls` refuses plain `http://` upstreams.

sendfile(2) cannot send through TLS (the kernel would write plaintext), so
edge.http.sendfile falls back to reads and writes on a TLS transport; the fast path and
the direct answers write through the transport and work unchanged.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from nearvoice.edge.checks import require

log = logging.getLogger("nearvoice.tls")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """`[tls]`: TLS on this node's listener; empty `cert` and `key` leave it off."""

    cert: str = ""
    """PEM file: the certificate chain, leaf first."""
    key: str = ""
    """PEM file: the private key of the leaf certificate."""
    client_ca: str = ""
    """PEM file of CAs whose client certificates are required (mutual TLS); empty: none."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key)

    def validate(self) -> None:
        require(
            bool(self.cert) == bool(self.key), "cert", "cert and key go together (both or none)"
        )
        require(not self.client_ca or self.enabled, "client_ca", "needs cert and key")


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The listener's context, or None when TLS is off. Raises ValueError for a half
    configuration and ssl.SSLError/OSError for unreadable files (reported at start-up)."""
    if not settings.enabled:
        return None
    if not (settings.cert and settings.key):
        raise ValueError("[tls] needs both cert and key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(settings.cert, settings.key)
    if settings.client_ca:
        ctx.load_verify_locations(cafile=settings.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def reload(ctx: ssl.SSLContext, settings: TlsSettings) -> bool:
    """Loads the certificate and key again into the live `ctx`; True when it worked.
    On failure the context keeps the chain it had."""
    try:
        ctx.load_cert_chain(settings.cert, settings.key)
        if settings.client_ca:
            ctx.load_verify_locations(cafile=settings.client_ca)
    except (OSError, ssl.SSLError) as exc:
        log.warning("TLS reload failed, keeping the old certificate: %s", exc)
        return False
    log.info("TLS certificate reloaded from %s", settings.cert)
    return True


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """The context for upstream connections: the system CAs, or only `ca` when given;
    this node's certificate when `cert` and `key` are given (mutual TLS)."""
    ctx = ssl.create_default_context(cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert or key:
        if not (cert and key):
            raise ValueError("[upstream] needs both cert and key for a client certificate")
        ctx.load_cert_chain(cert, key)
    return ctx


def require_https(bases: tuple[str, ...]) -> None:
    """Raises ValueError naming any upstream that is not https://."""
    plain = [base for base in bases if not base.lower().startswith("https://")]
    if plain:
        raise ValueError(f"[upstream] require_tls is on but these upstreams are not https: {plain}")
