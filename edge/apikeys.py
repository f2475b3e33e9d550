"""API keys of the OpenAI-compatible API and realtime sessions
(docs/contracts.md#the-openai-compatible-speech-api):
`NEARVOICE_API_KEYS="tenant:secret,..."`. Each name is a tenant with its own policy and
limits (`[api.tenants.<name>]`); a tenant may hold several keys, for rotation.

A bearer token is compared with every configured secret, each with
`hmac.compare_digest`, and without stopping at a match, so the time taken says nothing
about which key (or how much of one) matched.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass, field

API_KEYS_ENV = "NEARVOICE_API_KEYS"
MIN_SECRET_CHARS = 16
TENANT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ApiKeysError(ValueError):
    """NEARVOICE_API_KEYS is malformed; the message never contains a secret."""


@dataclass(frozen=True, slots=True)
class ApiKeys:
    entries: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    """(tenant, secret) pairs."""

    @classmethod
    def parse(cls, text: str) -> ApiKeys:
        entries: list[tuple[str, bytes]] = []
        for number, item in enumerate(filter(None, (p.strip() for p in text.split(","))), 1):
            tenant, sep, secret = item.partition(":")
            if not sep or not TENANT_RE.fullmatch(tenant):
                raise ApiKeysError(
                    f"{API_KEYS_ENV} entry {number} is not tenant:secret "
                    f"(tenant matching {TENANT_RE.pattern})"
                )
            if len(secret) < MIN_SECRET_CHARS:
                raise ApiKeysError(
                    f"{API_KEYS_ENV}: the secret of tenant {tenant!r} is shorter than "
                    f"{MIN_SECRET_CHARS} characters"
                )
            entries.append((tenant, secret.encode("utf-8")))
        return cls(tuple(entries))

    @classmethod
    def from_env(cls) -> ApiKeys:
        return cls.parse(os.environ.get(API_KEYS_ENV, ""))

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def tenants(self) -> list[str]:
        return sorted({tenant for tenant, _ in self.entries})

    def tenant_for(self, token: str) -> str | None:
        """The tenant whose secret `token` is, or None. Every secret is compared."""
        given = token.encode("utf-8", "surrogateescape")  # header bytes that are not UTF-8
        found = None
        for tenant, secret in self.entries:
            if hmac.compare_digest(given, secret) and found is None:
                found = tenant
        return found
