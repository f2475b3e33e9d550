"""edge/http/conditional.py: preconditions (RFC 9110 section 13) against a strong ETag."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from nearvoice.edge.http.conditional import (
    Precondition,
    evaluate,
    http_date_to_epoch,
    if_range_allows,
)

ETAG = '"' + "ab" * 32 + '"'
WEAK = "W/" + ETAG
OTHER = '"' + "cd" * 32 + '"'
LAST_MODIFIED = 1_700_000_000


def http_date(epoch: int) -> str:
    return formatdate(epoch, usegmt=True)


def run(
    *,
    get: bool = True,
    if_match: str | None = None,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    if_unmodified_since: str | None = None,
) -> Precondition:
    return evaluate(
        method_is_get_or_head=get,
        etag=ETAG,
        last_modified=LAST_MODIFIED,
        if_match=if_match,
        if_none_match=if_none_match,
        if_modified_since=if_modified_since,
        if_unmodified_since=if_unmodified_since,
    )


def test_no_conditions_proceed() -> None:
    assert run() is Precondition.PROCEED


# -- If-Match (strong) ---------------------------------------------------------------------


def test_if_match_with_the_strong_etag_proceeds() -> None:
    assert run(if_match=ETAG) is Precondition.PROCEED


def test_if_match_with_the_weak_form_of_the_etag_fails() -> None:
    assert run(if_match=WEAK) is Precondition.FAILED


def test_if_match_star_proceeds() -> None:
    assert run(if_match="*") is Precondition.PROCEED


def test_if_match_with_another_tag_fails() -> None:
    assert run(if_match=OTHER) is Precondition.FAILED


def test_if_match_list_containing_the_etag_proceeds() -> None:
    assert run(if_match=f"{OTHER}, {ETAG}") is Precondition.PROCEED


def test_if_match_with_an_unquoted_etag_fails() -> None:
    assert run(if_match=ETAG.strip('"')) is Precondition.FAILED


# -- If-None-Match (weak) ------------------------------------------------------------------


def test_if_none_match_with_the_etag_is_not_modified_for_get() -> None:
    assert run(if_none_match=ETAG) is Precondition.NOT_MODIFIED


def test_if_none_match_with_the_weak_form_is_not_modified_for_get() -> None:
    assert run(if_none_match=WEAK) is Precondition.NOT_MODIFIED


def test_if_none_match_star_is_not_modified_for_get() -> None:
    assert run(if_none_match="*") is Precondition.NOT_MODIFIED


def test_if_none_match_list_containing_the_etag_is_not_modified() -> None:
    assert run(if_none_match=f'{OTHER}, W/"x", {ETAG}') is Precondition.NOT_MODIFIED


def test_if_none_match_with_the_etag_fails_for_other_methods() -> None:
    assert run(get=False, if_none_match=ETAG) is Precondition.FAILED


def test_if_none_match_weak_form_fails_for_other_methods() -> None:
    assert run(get=False, if_none_match=WEAK) is Precondition.FAILED


def test_if_none_match_with_another_tag_proceeds() -> None:
    assert run(if_none_match=OTHER) is Precondition.PROCEED


# -- precedence ----------------------------------------------------------------------------


def test_if_match_takes_precedence_over_if_unmodified_since() -> None:
    # The date alone would fail (modified after it); a matching If-Match means it is ignored.
    earlier = http_date(LAST_MODIFIED - 3600)
    assert run(if_unmodified_since=earlier) is Precondition.FAILED
    assert run(if_match=ETAG, if_unmodified_since=earlier) is Precondition.PROCEED


def test_if_none_match_takes_precedence_over_if_modified_since() -> None:
    # The date alone would give 304; a non-matching If-None-Match means it is ignored.
    later = http_date(LAST_MODIFIED + 3600)
    assert run(if_modified_since=later) is Precondition.NOT_MODIFIED
    assert run(if_none_match=OTHER, if_modified_since=later) is Precondition.PROCEED


def test_failed_if_match_wins_over_matching_if_none_match() -> None:
    assert run(if_match=OTHER, if_none_match=ETAG) is Precondition.FAILED


# -- dates ---------------------------------------------------------------------------------


def test_if_unmodified_since_at_or_after_last_modified_proceeds() -> None:
    assert run(if_unmodified_since=http_date(LAST_MODIFIED)) is Precondition.PROCEED
    assert run(if_unmodified_since=http_date(LAST_MODIFIED + 60)) is Precondition.PROCEED


def test_if_unmodified_since_before_last_modified_fails() -> None:
    assert run(if_unmodified_since=http_date(LAST_MODIFIED - 1)) is Precondition.FAILED


def test_if_modified_since_later_date_is_not_modified() -> None:
    assert run(if_modified_since=http_date(LAST_MODIFIED + 60)) is Precondition.NOT_MODIFIED


def test_if_modified_since_equal_date_is_not_modified() -> None:
    assert run(if_modified_since=http_date(LAST_MODIFIED)) is Precondition.NOT_MODIFIED


def test_if_modified_since_earlier_date_proceeds() -> None:
    assert run(if_modified_since=http_date(LAST_MODIFIED - 1)) is Precondition.PROCEED


def test_if_modified_since_is_ignored_for_other_methods() -> None:
    later = http_date(LAST_MODIFIED + 60)
    assert run(get=False, if_modified_since=later) is Precondition.PROCEED


@pytest.mark.parametrize("value", ["yesterday", "", "Mon, 99 Foo 2023 25:61:61 GMT", "12345"])
def test_invalid_if_modified_since_is_ignored(value: str) -> None:
    assert run(if_modified_since=value) is Precondition.PROCEED


@pytest.mark.parametrize("value", ["yesterday", "", "Mon, 99 Foo 2023 25:61:61 GMT"])
def test_invalid_if_unmodified_since_is_ignored(value: str) -> None:
    assert run(if_unmodified_since=value) is Precondition.PROCEED


def test_http_date_to_epoch_parses_imf_fixdate() -> None:
    assert http_date_to_epoch("Tue, 14 Nov 2023 22:13:20 GMT") == LAST_MODIFIED


def test_http_date_without_zone_is_rejected() -> None:
    assert http_date_to_epoch("Tue, 14 Nov 2023 22:13:20 -0000") is None


# -- If-Range ------------------------------------------------------------------------------


def test_if_range_absent_allows() -> None:
    assert if_range_allows(None, ETAG, LAST_MODIFIED) is True


def test_if_range_strong_match_allows() -> None:
    assert if_range_allows(ETAG, ETAG, LAST_MODIFIED) is True


def test_if_range_weak_tag_does_not_allow() -> None:
    assert if_range_allows(WEAK, ETAG, LAST_MODIFIED) is False


def test_if_range_other_tag_does_not_allow() -> None:
    assert if_range_allows(OTHER, ETAG, LAST_MODIFIED) is False


def test_if_range_exact_date_allows() -> None:
    assert if_range_allows(http_date(LAST_MODIFIED), ETAG, LAST_MODIFIED) is True


@pytest.mark.parametrize("delta", [-1, 1, 3600])
def test_if_range_other_date_does_not_allow(delta: int) -> None:
    assert if_range_allows(http_date(LAST_MODIFIED + delta), ETAG, LAST_MODIFIED) is False


@pytest.mark.parametrize("value", ["garbage", "", "*", '"unterminated'])
def test_if_range_garbage_does_not_allow(value: str) -> None:
    assert if_range_allows(value, ETAG, LAST_MODIFIED) is False
