"""The limiter's token buckets (edge.limits) on a controlled clock, API keys
(edge.apikeys), the `[api]` and `[limits]` settings, and the spec's `rate` field."""

from __future__ import annotations

from pathlib import Path

import pytest

from nearvoice.edge.apikeys import ApiKeys, ApiKeysError
from nearvoice.edge.config import load
from nearvoice.edge.errors import TooManyRequests
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.limits import Limiter, RateLimited, Rates, Scope
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec, SpecError
from tests.support import Clock


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    refused: list[str] = []
    limiter = Limiter(16, on_refusal=refused.append, clock=clock)
    rates = Rates(miss_rate=2.0, miss_burst=3)
    for _ in range(3):
        limiter.take("alice", Scope.MISS, rates, "miss", "urls")
    with pytest.raises(RateLimited) as caught:
        limiter.take("alice", Scope.MISS, rates, "miss", "urls")
    assert isinstance(caught.value, TooManyRequests)
    assert caught.value.status == 429
    assert caught.value.headers == {
        "Retry-After": "1",
        "RateLimit-Policy": '"urls-miss";q=3;w=2',
        "RateLimit": '"urls-miss";r=0;t=1',
    }
    assert refused == ["miss"]
    clock.now += 0.5  # one token back at 2 per second
    limiter.take("alice", Scope.MISS, rates, "miss", "urls")
    with pytest.raises(RateLimited):
        limiter.take("alice", Scope.MISS, rates, "miss", "urls")
    clock.now += 100  # never more than the burst
    for _ in range(3):
        limiter.take("alice", Scope.MISS, rates, "miss", "urls")
    with pytest.raises(RateLimited):
        limiter.take("alice", Scope.MISS, rates, "miss", "urls")


def test_scopes_and_keys_have_their_own_buckets_and_zero_is_off() -> None:
    limiter = Limiter(16, clock=Clock())
    rates = Rates(hit_rate=0.0, miss_rate=1.0, miss_burst=1)
    limiter.take("alice", Scope.MISS, rates, "miss", "urls")
    limiter.take("bob", Scope.MISS, rates, "miss", "urls")
    for _ in range(1000):
        limiter.take("alice", Scope.HIT, rates, "hit", "urls")  # hit_rate 0: unlimited
    with pytest.raises(RateLimited):
        limiter.take("alice", Scope.MISS, rates, "miss", "urls")
    assert len(limiter) == 2  # no bucket is kept for an unlimited scope


def test_retry_after_is_the_time_until_a_token() -> None:
    limiter = Limiter(16, clock=Clock())
    rates = Rates(miss_rate=0.1, miss_burst=1)
    limiter.take("k", Scope.MISS, rates, "miss", "api")
    with pytest.raises(RateLimited) as caught:
        limiter.take("k", Scope.MISS, rates, "miss", "api")
    assert caught.value.headers["Retry-After"] == "10"


def test_buckets_are_bounded_least_recently_used_first() -> None:
    clock = Clock()
    limiter = Limiter(2, clock=clock)
    rates = Rates(miss_rate=0.001, miss_burst=1)
    limiter.take("a", Scope.MISS, rates, "miss", "urls")
    limiter.take("b", Scope.MISS, rates, "miss", "urls")
    with pytest.raises(RateLimited):
        limiter.take("a", Scope.MISS, rates, "miss", "urls")  # a is now the most recent
    limiter.take("c", Scope.MISS, rates, "miss", "urls")  # drops b, the least recent
    assert len(limiter) == 2
    limiter.take("b", Scope.MISS, rates, "miss", "urls")  # b comes back full
    with pytest.raises(RateLimited):
        limiter.take("c", Scope.MISS, rates, "miss", "urls")


def test_api_keys_name_tenants_and_never_leak_secrets() -> None:
    keys = ApiKeys.parse("acme:acme-secret-0123456789, beta:beta-secret-0123456789")
    assert keys.tenant_for("acme-secret-0123456789") == "acme"
    assert keys.tenant_for("beta-secret-0123456789") == "beta"
    assert keys.tenant_for("acme-secret-012345678") is None
    assert keys.tenants == ["acme", "beta"]
    assert "secret" not in repr(keys)
    assert not ApiKeys.parse("")
    with pytest.raises(ApiKeysError) as caught:
        ApiKeys.parse("acme:short")
    assert "short" not in str(caught.value).replace("shorter", "")
    with pytest.raises(ApiKeysError):
        ApiKeys.parse("no-colon-here-0123456789")


def test_api_and_limits_settings_load_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(
        """
[api]
url_ttl = 600
[api.voices]
alloy = "heart"
[api.tenants.acme]
policy = "personal"
miss_rate = 2
miss_burst = 4
realtime_sessions = 8
[limits]
hit_rate = 50
[limits.policy.draft]
miss_rate = 1
"""
    )
    config = load(path)
    assert config.api.url_ttl == 600
    assert config.api.voices == {"alloy": "heart"}
    acme = config.api.tenant("acme")
    assert acme.policy is Policy.PERSONAL
    assert acme.rates == Rates(0.0, 0.0, 2, 4)
    assert acme.realtime_sessions == 8
    assert config.api.tenant("other").policy is Policy.HOT
    assert config.limits.rates().hit_rate == 50
    assert config.limits.rates("draft") == Rates(miss_rate=1)
    path.write_text("[api.tenants.acme]\nmiss_rat = 2\n")
    with pytest.raises(ValueError, match=r"api\.tenants\.acme"):
        load(path)


def test_rate_is_in_the_canonical_spec_only_when_set() -> None:
    fields = {"text": "Hello.", "voice": "joe", "format": AudioFormat.PCM, "model": "m@1"}
    plain = Spec.create(**fields)  # type: ignore[arg-type]
    resampled = Spec.create(**fields, rate=24000)  # type: ignore[arg-type]
    assert b"rate" not in plain.to_json()
    assert b'"rate":24000' in resampled.to_json()
    assert plain.key != resampled.key
    assert Spec.from_json(resampled.to_json()) == resampled
    assert Spec.from_json(plain.to_json()).rate is None
    with pytest.raises(SpecError):
        Spec.create(**fields, rate=100)  # type: ignore[arg-type]
    with pytest.raises(SpecError):
        Spec.from_json(plain.to_json().replace(b"}", b',"rate":"24000"}'))


# -- buckets shared by a node's workers ----------------------------------------------------


def _take_all(path: str, attempts: int) -> int:
    """In another process: how many of `attempts` hits one shared bucket admits."""
    limiter = Limiter(64, shared=Path(path))
    rates = Rates(hit_rate=1e-6, hit_burst=20)
    admitted = 0
    for _ in range(attempts):
        try:
            limiter.take("203.0.113.5", Scope.HIT, rates, "hit", "ip")
            admitted += 1
        except RateLimited:
            pass
    return admitted


def test_workers_share_one_bucket(tmp_path: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor

    path = str(tmp_path / "limits.buckets")
    with ProcessPoolExecutor(4) as pool:
        admitted = sum(pool.map(_take_all, [path] * 4, [15] * 4))
    assert admitted == 20  # the burst, once, across all four processes


def test_shared_buckets_refill_and_keep_keys_apart(tmp_path: Path) -> None:
    clock = Clock()
    first = Limiter(64, clock=clock, shared=tmp_path / "b")
    second = Limiter(64, clock=clock, shared=tmp_path / "b")
    rates = Rates(miss_rate=1.0, miss_burst=2)
    first.take("alice", Scope.MISS, rates, "miss", "ip")
    second.take("alice", Scope.MISS, rates, "miss", "ip")
    assert not first.allows("alice", Scope.MISS, rates)
    with pytest.raises(RateLimited):
        second.take("alice", Scope.MISS, rates, "miss", "ip")
    second.take("bob", Scope.MISS, rates, "miss", "ip")
    assert first.allows("alice", Scope.HIT, rates)  # another scope, unlimited
    clock.now += 1.0
    first.take("alice", Scope.MISS, rates, "miss", "ip")
    assert first.shared is not None and second.shared is not None
    first.shared.close()
    second.shared.close()
