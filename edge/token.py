"""Signed speech URLs (docs/contracts.md#signed-urls, a contract).

    GET /v1/speech/{key}.{ext}?s=...&exp=...&kid=...&p=...[&ip=...]&sig=...

* `s` is the canonical spec sealed with AES-256-GCM (12-byte random nonce, the key id as
  associated data), base64url without padding. The text never appears in a URL or a log,
  yet any node holding the keyring can render the object from the URL alone.
* `sig` is HMAC-SHA256 over a canonical, newline-delimited string that binds the path
  (and so the key and format) and every other signed field; an absent `ip` is bound as
  empty so it cannot be added later. It is compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from urllib.parse import urlencode

from cryptography.exceptions import InvalidTag

from nearvoice.edge.errors import BadRequest, Forbidden, Gone, RequestError
from nearvoice.edge.keyring import Keyring, SigningKey
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec, SpecError

SPEECH_PREFIX = "/v1/speech/"
SIGNED_FIELDS = ("s", "exp", "kid", "p", "ip")
QUERY_FIELDS = frozenset((*SIGNED_FIELDS, "sig"))
REQUIRED_FIELDS = ("s", "exp", "kid", "p", "sig")
_DOMAIN = b"nearvoice-url-v1"
_NONCE_BYTES = 12
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    """Strict base64url: the standard decoder skips foreign characters and ignores unused
    low bits, which would let many spellings of one signature verify."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64e(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def speech_path(spec: Spec) -> str:
    return f"{SPEECH_PREFIX}{spec.key}.{spec.format.value}"


def canonical_string(path: str, fields: Mapping[str, str]) -> bytes:
    """What `sig` signs: a domain tag, the path, then each signed field as name=value."""
    lines = [_DOMAIN, path.encode("utf-8")]
    lines.extend(f"{name}={fields.get(name, '')}".encode() for name in SIGNED_FIELDS)
    return b"\n".join(lines)


def _mac(key: SigningKey, path: str, fields: Mapping[str, str]) -> bytes:
    return hmac.new(key.sign_key, canonical_string(path, fields), sha256).digest()


def seal_spec(key: SigningKey, spec: Spec) -> str:
    nonce = os.urandom(_NONCE_BYTES)
    return _b64e(nonce + key.seal.encrypt(nonce, spec.to_json(), key.kid.encode("ascii")))


def unseal_spec(key: SigningKey, sealed: str) -> Spec:
    try:
        raw = _b64d(sealed)
        plain = key.seal.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], key.kid.encode("ascii"))
    except (binascii.Error, ValueError, InvalidTag) as exc:
        raise Forbidden("bad_seal", "sealed spec does not decrypt") from exc
    try:
        return Spec.from_json(plain)
    except SpecError as exc:
        raise BadRequest(exc.code, str(exc)) from exc


def parse_network(cidr: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ValueError(f"not an IP address or CIDR: {cidr!r}") from exc


def sign_query(
    keyring: Keyring,
    spec: Spec,
    *,
    policy: Policy,
    ttl: int,
    ip: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """The query fields of a signed URL for `spec`, in URL order."""
    key = keyring.signer
    fields = {
        "s": seal_spec(key, spec),
        "exp": str(int(now if now is not None else time.time()) + int(ttl)),
        "kid": key.kid,
        "p": policy.value,
    }
    if ip:
        fields["ip"] = str(parse_network(ip))
    fields["sig"] = _b64e(_mac(key, speech_path(spec), fields))
    return fields


def sign_url(
    keyring: Keyring,
    base: str,
    spec: Spec,
    *,
    policy: Policy,
    ttl: int,
    ip: str | None = None,
    now: float | None = None,
) -> str:
    query = sign_query(keyring, spec, policy=policy, ttl=ttl, ip=ip, now=now)
    return f"{base.rstrip('/')}{speech_path(spec)}?{urlencode(query)}"


def check_sign_limits(
    spec: Spec, url: str, base: str, *, max_text_chars: int, max_line_size: int
) -> None:
    """Raises ValueError when nodes with these limits would refuse `url` (signed for
    `spec` under `base`): a text longer than `max_text_chars` after normalization, or a
    request line longer than `max_line_size` bytes. Signing such a URL helps no one."""
    if len(spec.text) > max_text_chars:
        raise ValueError(
            f"the text is {len(spec.text)} characters after normalization; "
            f"nodes refuse more than {max_text_chars} ([synth] max_text_chars)"
        )
    target = url[len(base.rstrip("/")) :]
    line = len(f"GET {target} HTTP/1.1".encode())
    if line > max_line_size:
        raise ValueError(
            f"the URL makes a {line}-byte request line; "
            f"nodes refuse more than {max_line_size} ([http] max_line_size)"
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified URL allows: this spec, under this policy, until `expires`."""

    spec: Spec
    policy: Policy
    expires: int
    network: IPNetwork | None = None
    """The client addresses the URL is bound to, if any."""


def check_query_shape(query: Mapping[str, str], repeated: bool) -> None:
    """Unknown or repeated parameters are refused before any crypto: an edge must not
    guess which of two `sig` values a client meant, nor ignore a field it cannot verify."""
    unknown = sorted(set(query) - QUERY_FIELDS)
    if unknown:
        raise BadRequest("unknown_parameter", f"unknown query parameter(s): {', '.join(unknown)}")
    if repeated:
        raise BadRequest("repeated_parameter", "a query parameter appears more than once")
    if "sig" not in query:
        raise Forbidden("bad_signature", "missing signature")
    missing = [name for name in REQUIRED_FIELDS if name not in query]
    if missing:
        raise BadRequest("missing_parameter", f"missing query parameter(s): {', '.join(missing)}")


def verify(
    keyring: Keyring,
    path: str,
    key: str,
    query: Mapping[str, str],
    *,
    client_ip: str | None,
    now: float,
    skew: float,
) -> Grant:
    """Verifies a signed speech URL whose shape `check_query_shape` accepted."""
    grant = verify_signature(keyring, path, key, query)
    check_use(grant, client_ip=client_ip, now=now, skew=skew)
    return grant


def verify_signature(keyring: Keyring, path: str, key: str, query: Mapping[str, str]) -> Grant:
    """The time- and client-independent part of verification: signature, seal, key.

    Its result depends only on the URL, so a node may memoize it per exact URL; `check_use`
    must still run on every request. Order matters: the signature is checked before
    anything it protects is interpreted, so forged fields never reach the parsers.
    """
    signing_key = keyring.get(query["kid"])
    if signing_key is None:
        raise Forbidden("unknown_kid", "URL is signed with an unknown key id")
    try:
        given = _b64d(query["sig"])
    except (binascii.Error, ValueError):
        given = b""
    if not hmac.compare_digest(given, _mac(signing_key, path, query)):
        raise Forbidden("bad_signature", "signature does not match")
    try:
        expires = int(query["exp"])
    except ValueError as exc:
        raise BadRequest("bad_expiry", "exp is not an integer") from exc
    policy = Policy.parse(query["p"])
    if policy is None:
        raise BadRequest("bad_policy", f"unknown policy {query['p']!r}")
    network = None
    if "ip" in query:
        try:
            network = parse_network(query["ip"])
        except ValueError as exc:
            raise BadRequest("bad_ip", str(exc)) from exc
    spec = unseal_spec(signing_key, query["s"])
    if not hmac.compare_digest(spec.key, key):
        raise Forbidden("key_mismatch", "key is not the hash of the sealed spec")
    return Grant(spec=spec, policy=policy, expires=expires, network=network)


def check_use(grant: Grant, *, client_ip: str | None, now: float, skew: float) -> None:
    """The per-request checks: expiry (with clock skew) and the client address."""
    if now > grant.expires + skew:
        raise Gone("expired", "URL has expired")
    if grant.network is not None:
        try:
            address = ipaddress.ip_address(client_ip or "")
        except ValueError:
            address = None
        # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        allowed = address is not None and address in grant.network
        if not allowed:
            raise Forbidden("ip_mismatch", "URL is bound to another client address")


__all__ = [
    "Grant",
    "RequestError",
    "check_query_shape",
    "check_use",
    "sign_query",
    "sign_url",
    "speech_path",
    "verify",
    "verify_signature",
]
