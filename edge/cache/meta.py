"""Metadata stored with every cached object."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from edge.policy import Policy


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    key: str
    """The spec key (lowercase hex SHA-256 of the canonical spec)."""
    content_type: str
    length: int
    """Body length in bytes."""
    etag: str
    """Strong entity-tag, quoted. Renders are deterministic, so the key identifies the bytes."""
    sha256: str
    """Hex SHA-256 of the body, checked before the object becomes visible."""
    policy: Policy
    stored_at: float
    """Unix seconds when the object was committed."""
    ttl: int
    """Seconds the object stays fresh after `stored_at`."""

    def fresh(self, now: float) -> bool:
        return now < self.stored_at + self.ttl

    @property
    def last_modified(self) -> int:
        return int(self.stored_at)

    def to_tag(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_tag(cls, tag: str) -> ObjectMeta:
        data = json.loads(tag)
        data["policy"] = Policy(data["policy"])
        return cls(**data)


def etag_for(key: str) -> str:
    return f'"{key}"'
