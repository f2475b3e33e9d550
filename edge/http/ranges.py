"""Pure parsing of the `Range` request header (RFC 9110 section 14.2).

`parse_range` returns half-open `(start, end)` byte ranges, or None when the header must be
ignored and the whole representation sent with 200. Where RFC 9110 leaves a choice, it does
what nginx does for a static file, so players see the same answers from us as from the most
common origin (a differential test against a real nginx keeps this honest):

* a header that does not start with `bytes=` (case-insensitively) is ignored (14.2: an
  unknown range unit MUST be ignored);
* a syntactically invalid ranges-specifier is rejected with 416 rather than ignored
  (14.2 allows either);
* ranges whose first-pos is past the end are dropped; if none is left, 416 (15.5.17);
* a suffix longer than the representation selects all of it (14.1.3);
* more ranges than the cap, or ranges adding up to more than the representation (a sign of
  overlapping abuse, 15.5.17), make the server ignore the header and send 200;
* ranges are kept in the order asked and are not coalesced.
"""

from __future__ import annotations

import re

ByteRange = tuple[int, int]
"""A half-open byte range: `start` inclusive, `end` exclusive."""

_UNIT = "bytes="
_MAX_OFFSET = (1 << 63) - 1  # nginx's NGX_MAX_OFF_T_VALUE: larger numbers are invalid
_DIGITS = "0123456789"
# What players send nearly always: one `first-[last]` range, no spaces. 18 digits stay
# below _MAX_OFFSET, so the overflow rule cannot apply; anything else takes the full parser.
_SIMPLE = re.compile(r"[Bb][Yy][Tt][Ee][Ss]=([0-9]{1,18})-([0-9]{0,18})")


class RangeError(Exception):
    """The Range header was rejected; the answer is 416 with `Content-Range: bytes */N`."""


class MalformedRange(RangeError):
    """The ranges-specifier does not follow the grammar of RFC 9110 section 14.1.1."""


class UnsatisfiableRange(RangeError):
    """No range in the header overlaps the representation."""


def parse_range(header: str, length: int, max_ranges: int) -> list[ByteRange] | None:
    """Parses a Range header against a representation of `length` bytes.

    Returns the ranges to send, or None to ignore the header and send 200. Raises
    `MalformedRange` or `UnsatisfiableRange` for a 416.
    """
    simple = _SIMPLE.fullmatch(header)
    if simple is not None and max_ranges >= 1:
        start = int(simple.group(1))
        last = simple.group(2)
        end = min(int(last) + 1, length) if last else length
        if start < end:
            return [(start, end)]
        if start == 0:
            return None
        raise UnsatisfiableRange("no range overlaps the representation")
    if len(header) <= len(_UNIT) or header[: len(_UNIT)].lower() != _UNIT:
        return None
    text = header[len(_UNIT) :]
    n = len(text)
    pos = 0
    ranges: list[ByteRange] = []
    total = 0

    def skip_spaces(i: int) -> int:
        while i < n and text[i] == " ":
            i += 1
        return i

    def number(i: int) -> tuple[int, int]:
        if i >= n or text[i] not in _DIGITS:
            raise MalformedRange("expected a digit")
        value = 0
        while i < n and text[i] in _DIGITS:
            value = value * 10 + ord(text[i]) - 48
            if value > _MAX_OFFSET:
                raise MalformedRange("byte position out of range")
            i += 1
        return value, i

    while True:
        pos = skip_spaces(pos)
        if pos < n and text[pos] == "-":
            suffix, pos = number(pos + 1)
            # A suffix longer than the representation selects all of it (14.1.3);
            # `-0` selects nothing.
            start, end = max(length - suffix, 0), length
        else:
            start, pos = number(pos)
            pos = skip_spaces(pos)
            if pos >= n or text[pos] != "-":
                raise MalformedRange("expected '-'")
            pos = skip_spaces(pos + 1)
            if pos >= n or text[pos] == ",":
                end = length
            else:
                last, pos = number(pos)
                end = min(last + 1, length)
        pos = skip_spaces(pos)
        if pos < n and text[pos] != ",":
            raise MalformedRange("unexpected character")

        if start < end:
            ranges.append((start, end))
            total += end - start
            if len(ranges) > max_ranges:
                return None
        elif start == 0:
            # Only an empty representation gets here: nothing to range over.
            return None

        if pos >= n:
            break
        pos += 1  # the comma

    if not ranges:
        raise UnsatisfiableRange("no range overlaps the representation")
    if total > length:
        return None
    return ranges


def content_range(byte_range: ByteRange, length: int | None) -> str:
    """`bytes first-last/complete` (RFC 9110 section 14.4); `*` when the length is unknown."""
    start, end = byte_range
    return f"bytes {start}-{end - 1}/{'*' if length is None else length}"


def unsatisfied_range(length: int) -> str:
    """The Content-Range of a 416 (RFC 9110 section 15.5.17)."""
    return f"bytes */{length}"
