"""edge/http/ranges.py: pure Range header parsing (RFC 9110 section 14.2)."""

from __future__ import annotations

import pytest

from nearvoice.edge.http.ranges import (
    MalformedRange,
    RangeError,
    UnsatisfiableRange,
    content_range,
    parse_range,
    unsatisfied_range,
)

LENGTH = 1000
MAX = 16


def parse(header: str, length: int = LENGTH, max_ranges: int = MAX) -> list[tuple[int, int]] | None:
    return parse_range(header, length, max_ranges)


def test_single_closed_range_is_half_open() -> None:
    assert parse("bytes=0-99") == [(0, 100)]


def test_single_byte_range() -> None:
    assert parse("bytes=5-5") == [(5, 6)]


def test_last_pos_past_the_end_is_clamped() -> None:
    assert parse("bytes=900-5000") == [(900, LENGTH)]


def test_open_ended_range_runs_to_the_end() -> None:
    assert parse("bytes=500-") == [(500, LENGTH)]


def test_suffix_range_selects_the_last_bytes() -> None:
    assert parse("bytes=-100") == [(900, LENGTH)]


def test_suffix_longer_than_the_representation_selects_all_of_it() -> None:
    assert parse("bytes=-5000") == [(0, LENGTH)]


def test_suffix_zero_alone_is_unsatisfiable() -> None:
    with pytest.raises(UnsatisfiableRange):
        parse("bytes=-0")


def test_start_past_the_end_is_unsatisfiable() -> None:
    with pytest.raises(UnsatisfiableRange):
        parse(f"bytes={LENGTH}-")


def test_start_past_the_end_is_dropped_when_another_range_is_satisfiable() -> None:
    assert parse("bytes=2000-3000,0-9") == [(0, 10)]


def test_unsatisfiable_and_malformed_are_range_errors() -> None:
    assert issubclass(UnsatisfiableRange, RangeError)
    assert issubclass(MalformedRange, RangeError)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=abc",
        "bytes=-",
        "bytes=1",
        "bytes=1-2-3",
        "bytes=10-5x",
        "bytes=,",
        "bytes=0-1,,2-3",
        "bytes=--5",
        "bytes=99999999999999999999-",
    ],
)
def test_malformed_specifier_raises_malformed_range(header: str) -> None:
    with pytest.raises(MalformedRange):
        parse(header)


@pytest.mark.parametrize("header", ["items=0-10", "bits=0-1", "bytes", "bytes=", "0-10", ""])
def test_header_without_bytes_unit_is_ignored(header: str) -> None:
    assert parse(header) is None


def test_unit_is_case_insensitive() -> None:
    assert parse("Bytes=0-0") == [(0, 1)]


def test_spaces_around_tokens_are_allowed() -> None:
    assert parse("bytes= 0 - 9 , 20 - 29") == [(0, 10), (20, 30)]


def test_more_ranges_than_the_cap_are_ignored() -> None:
    header = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(5))
    assert parse(header, max_ranges=4) is None


def test_exactly_the_cap_of_ranges_is_honoured() -> None:
    header = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(4))
    assert parse(header, max_ranges=4) == [(0, 2), (10, 12), (20, 22), (30, 32)]


def test_overlapping_ranges_adding_up_past_the_length_are_ignored() -> None:
    assert parse("bytes=0-799,100-899") is None


def test_overlapping_ranges_within_the_length_are_kept_uncoalesced() -> None:
    assert parse("bytes=0-9,5-14") == [(0, 10), (5, 15)]


def test_ranges_keep_the_order_asked() -> None:
    assert parse("bytes=500-599,0-99,-10") == [(500, 600), (0, 100), (990, LENGTH)]


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=0-10", "bytes=-10"])
def test_empty_representation_ignores_the_header(header: str) -> None:
    assert parse(header, length=0) is None


def test_empty_representation_with_start_past_zero_is_unsatisfiable() -> None:
    with pytest.raises(UnsatisfiableRange):
        parse("bytes=5-10", length=0)


def test_content_range_uses_inclusive_last_byte() -> None:
    assert content_range((0, 100), 1000) == "bytes 0-99/1000"


def test_content_range_unknown_length_is_star() -> None:
    assert content_range((10, 11), None) == "bytes 10-10/*"


def test_unsatisfied_range_string() -> None:
    assert unsatisfied_range(1000) == "bytes */1000"
