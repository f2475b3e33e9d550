"""edge/policy.py: caching policies (the policy table of docs/contracts.md#signed-urls)."""

from __future__ import annotations

import pytest

from nearvoice.edge.policy import Policy, Retention


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (Policy.HOT, "public, max-age=86400, immutable"),
        (Policy.PERSONAL, "private, max-age=3600"),
        (Policy.DRAFT, "no-store"),
    ],
)
def test_cache_control_matches_the_design_table(policy: Policy, expected: str) -> None:
    assert policy.cache_control == expected


def test_policy_values_are_the_url_spellings() -> None:
    assert [p.value for p in Policy] == ["hot", "personal", "draft"]


@pytest.mark.parametrize("value", ["hot", "personal", "draft"])
def test_parse_accepts_each_policy(value: str) -> None:
    policy = Policy.parse(value)
    assert policy is not None
    assert policy.value == value


@pytest.mark.parametrize("value", ["HOT", "", "public", " hot"])
def test_parse_rejects_anything_else(value: str) -> None:
    assert Policy.parse(value) is None


def test_draft_is_not_stored() -> None:
    assert Policy.DRAFT.stored is False


@pytest.mark.parametrize("policy", [Policy.HOT, Policy.PERSONAL])
def test_hot_and_personal_are_stored(policy: Policy) -> None:
    assert policy.stored is True


def test_default_retention_keeps_hot_for_at_least_24_hours() -> None:
    assert Retention().ttl(Policy.HOT) >= 86400


def test_default_retention_keeps_personal_for_one_hour() -> None:
    assert Retention().ttl(Policy.PERSONAL) == 3600


def test_retention_of_draft_is_zero() -> None:
    assert Retention().ttl(Policy.DRAFT) == 0


def test_configured_retention_is_used() -> None:
    retention = Retention(hot=100_000, personal=60)
    assert retention.ttl(Policy.HOT) == 100_000
    assert retention.ttl(Policy.PERSONAL) == 60
