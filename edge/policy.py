"""Caching policies carried by signed URLs (docs/contracts.md#signed-urls)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from nearvoice.edge.checks import at_least


class Policy(StrEnum):
    HOT = "hot"  # shared templates and popular lines
    PERSONAL = "personal"  # one user's own lines
    DRAFT = "draft"  # edits in progress: never stored

    @classmethod
    def parse(cls, value: str) -> Policy | None:
        try:
            return cls(value)
        except ValueError:
            return None

    @property
    def stored(self) -> bool:
        return self is not Policy.DRAFT

    @property
    def cache_control(self) -> str:
        return _CACHE_CONTROL[self]


_CACHE_CONTROL: dict[Policy, str] = {
    Policy.HOT: "public, max-age=86400, immutable",
    Policy.PERSONAL: "private, max-age=3600",
    Policy.DRAFT: "no-store",
}


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the edge keeps an object of each policy fresh."""

    hot: int = 7 * 86400
    """Seconds a `hot` object stays fresh (the contract asks for 24 h or more)."""
    personal: int = 3600
    """Seconds a `personal` object stays fresh."""

    def validate(self) -> None:
        at_least(self, "hot", 86400)  # the contract: 24 h or more (docs/contracts.md#signed-urls)
        at_least(self, "personal", 1)

    def ttl(self, policy: Policy) -> int:
        if policy is Policy.HOT:
            return self.hot
        if policy is Policy.PERSONAL:
            return self.personal
        return 0
