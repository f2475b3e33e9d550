"""The node's one rate limiter (docs/contracts.md#rate-limits), shared by every door.

Token buckets: a bucket holds up to `burst` tokens and gains `rate` tokens a second; a
request takes one token or is refused. Each door keys its buckets by who asks: the API
and realtime sessions by tenant, signed URLs by client address and by signing key id.
Every request is in one of two scopes, `hit` (it starts no work: a cached object, or a fill
already under way) or `miss` (it would start a render or an upstream fetch), each with its
own rates, so a client can replay cached audio at a high rate while its renders are held
to what the engines can afford. The caller tells them apart by looking the key up first
(edge.core); a request over its miss budget is refused before any fill starts.

State is bounded like nginx's `limit_req` zone: at most `max_buckets` buckets, least
recently used dropped first. A dropped bucket comes back full, so the bound must exceed
the number of clients active within a bucket's refill time (burst / rate) for the limits
to hold exactly; memory stays bounded whatever arrives.

A refusal is a 429 (RFC 6585 section 4) with `Retry-After` (RFC 9110 section 10.2.3) and
the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy`
names the bucket with its quota `q` (the burst) and window `w` (seconds to refill it from
empty), and `RateLimit` says `r` (tokens remaining, 0) and `t` (seconds until a request
would be admitted again). `nearvoice_rate_limited_total{scope}` counts refusals: `hit` and
`miss` for signed URLs, `api` for the OpenAI-compatible API's tenants (either bucket),
`realtime` for realtime sessions.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import math
import mmap
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from nearvoice.edge.errors import RequestError, TooManyRequests


class Scope(StrEnum):
    """Which budget a request spends."""

    HIT = "hit"
    MISS = "miss"


@dataclass(frozen=True, slots=True)
class Rates:
    """Token-bucket rates for the two scopes; 0 turns a scope's limit off."""

    hit_rate: float = 0.0
    """Requests per second that start no work (hits, joins of a fill under way)."""
    hit_burst: float = 0.0
    """Requests a client may make at once above `hit_rate`; 0 means `hit_rate` (at least 1)."""
    miss_rate: float = 0.0
    """Requests per second that start a render or an upstream fetch."""
    miss_burst: float = 0.0
    """Misses a client may make at once above `miss_rate`; 0 means `miss_rate` (at least 1)."""

    def of(self, scope: Scope) -> tuple[float, float]:
        """(rate, burst) for `scope`; rate 0 means unlimited."""
        if scope is Scope.HIT:
            rate, burst = self.hit_rate, self.hit_burst
        else:
            rate, burst = self.miss_rate, self.miss_burst
        if rate < 0 or burst < 0:
            raise ValueError("rates and bursts must not be negative")
        return rate, (burst or max(1.0, rate))


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """`[limits]`: signed URLs' buckets, per client address and per key id."""

    hit_rate: float = 0.0
    """Requests per second, per client address and per key id, that start no work; 0: off."""
    hit_burst: float = 0.0
    """Hits allowed at once above `hit_rate`; 0 means `hit_rate`."""
    miss_rate: float = 0.0
    """Requests per second, per client address and per key id, that start a fill; 0: off."""
    miss_burst: float = 0.0
    """Misses allowed at once above `miss_rate`; 0 means `miss_rate`."""
    max_buckets: int = 100_000
    """Buckets kept (each about 200 bytes); least recently used dropped first."""
    policy: dict[str, Rates] = field(default_factory=dict)
    """`[limits.policy.<hot|personal|draft>]`: rates for URLs of that policy instead."""

    @property
    def enabled(self) -> bool:
        """Whether any signed-URL limit is configured (a cheap check per request)."""
        return bool(self.hit_rate or self.miss_rate or self.policy)

    def rates(self, policy: str | None = None) -> Rates:
        found = self.policy.get(policy) if policy is not None else None
        if found is not None:
            return found
        return Rates(self.hit_rate, self.hit_burst, self.miss_rate, self.miss_burst)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimited(TooManyRequests):
    """A request over its budget; the headers say when to come back."""


@functools.lru_cache(maxsize=65536)
def _record_of(key: Hashable, slots: int) -> tuple[bytes, int]:
    """(16-byte hash of `key`, byte offset of its record): the same in every process,
    unlike hash(); cached, since the same clients come back."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
    return digest, int.from_bytes(digest[:8], "little") % slots * SharedBuckets.RECORD.size


class SharedBuckets:
    """Buckets in one file that every worker of a node maps (docs/contracts.md#rate-limits: buckets
    are shared by a node's workers). A fixed table of `slots` records of 32 bytes (a
    16-byte hash of the bucket's key, its tokens, its stamp), each found by its key's
    hash; a record whose hash differs belongs to another key and is taken over, full,
    which bounds state exactly as the in-process LRU does. Each update holds a POSIX
    byte-range lock on its one record (fcntl.lockf), so workers updating different
    buckets never wait on each other. CLOCK_MONOTONIC is system-wide on Linux, so stamps
    written by one process are meaningful to the others."""

    RECORD = struct.Struct("<16sdd")

    def __init__(self, path: Path, slots: int) -> None:
        self.slots = slots
        size = slots * self.RECORD.size
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)  # zeros: every record free
        self._map = mmap.mmap(self._fd, size)

    def tokens(self, key: Hashable, rate: float, burst: float, now: float, spend: float) -> float:
        """The bucket's tokens after refilling to `now`, before spending `spend` of them
        (which happens when there are that many; 0 spends nothing)."""
        digest, offset = _record_of(key, self.slots)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, self.RECORD.size, offset)
        try:
            owner, tokens, stamp = self.RECORD.unpack_from(self._map, offset)
            if owner != digest:
                tokens, stamp = burst, now
            else:
                tokens = min(burst, tokens + max(0.0, now - stamp) * rate)
            left = tokens - spend if spend and tokens >= spend else tokens
            self.RECORD.pack_into(self._map, offset, digest, left, now)
            return float(tokens)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, self.RECORD.size, offset)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class Limiter:
    def __init__(
        self,
        max_buckets: int,
        on_refusal: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared: Path | None = None,
    ) -> None:
        """`shared`: a file whose buckets the node's workers share (`SharedBuckets`);
        None keeps them in this process."""
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self._max = max_buckets
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()
        self._on_refusal = on_refusal
        self._clock = clock
        self.shared = SharedBuckets(shared, max_buckets) if shared is not None else None

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(
        self, key: Hashable, scope: Scope, rate: float, burst: float, spend: float
    ) -> float:
        """Tokens in the bucket of (`key`, `scope`) refilled to now (a new bucket is full),
        then `spend` of them taken if there are that many (0: a look only)."""
        now = self._clock()
        slot = (key, scope)
        if self.shared is not None:
            return self.shared.tokens(slot, rate, burst, now, spend)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = _Bucket(burst, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(slot)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
        tokens = bucket.tokens
        if spend and tokens >= spend:
            bucket.tokens -= spend
        return tokens

    def allows(self, key: Hashable, scope: Scope, rates: Rates) -> bool:
        """Whether `take` would admit a request now; takes nothing and counts nothing
        (the fast path asks first and leaves refusals to the ordinary path)."""
        rate, burst = rates.of(scope)
        return rate == 0 or self._tokens(key, scope, rate, burst, spend=0.0) >= 1.0

    def take(
        self, key: Hashable, scope: Scope, rates: Rates, label: str, name: str, cost: float = 1.0
    ) -> None:
        """Takes `cost` tokens (one request; a realtime session's characters) from the
        bucket of (`key`, `scope`), or raises RateLimited. `label` is the metric's scope
        label; `name` names the policy in the headers."""
        rate, burst = rates.of(scope)
        if rate == 0:
            return
        tokens = self._tokens(key, scope, rate, burst, spend=cost)
        if tokens >= cost:
            return
        wait = max(1, math.ceil((cost - tokens) / rate))
        if self._on_refusal is not None:
            self._on_refusal(label)
        policy_name = f"{name}-{scope.value}"
        raise RateLimited(
            "rate_limited",
            f"over the {scope.value} rate limit of {rate:g}/s (burst {burst:g}); retry in {wait} s",
            headers={
                "Retry-After": str(wait),
                "RateLimit-Policy": f'"{policy_name}";q={int(burst)};w={math.ceil(burst / rate)}',
                "RateLimit": f'"{policy_name}";r=0;t={wait}',
            },
            scope=scope.value,
        )


__all__ = [
    "LimitSettings",
    "Limiter",
    "RateLimited",
    "Rates",
    "RequestError",
    "Scope",
]
