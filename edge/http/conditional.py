"""Conditional requests (RFC 9110 section 13) against an immutable object's strong ETag and
Last-Modified. Pure functions: the handler passes header values in and acts on the outcome.
"""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime
from enum import Enum, auto

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE  (RFC 9110 section 8.8.3)
_ETAG_RE = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


class Precondition(Enum):
    PROCEED = auto()
    NOT_MODIFIED = auto()  # 304
    FAILED = auto()  # 412


def _tags(header: str) -> list[tuple[bool, str]] | None:
    """(weak, opaque-tag) pairs, or None for `*`. Unparseable members are dropped."""
    if header.strip() == "*":
        return None
    return [(m.group(1) is not None, m.group(2)) for m in _ETAG_RE.finditer(header)]


def _matches(header: str, etag: str, *, weak: bool) -> bool:
    tags = _tags(header)
    if tags is None:
        return True
    return any(tag == etag and (weak or not is_weak) for is_weak, tag in tags)


def http_date_to_epoch(value: str) -> int | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return int(parsed.timestamp())


def evaluate(
    *,
    method_is_get_or_head: bool,
    etag: str,
    last_modified: int,
    if_match: str | None,
    if_none_match: str | None,
    if_modified_since: str | None,
    if_unmodified_since: str | None,
) -> Precondition:
    """The precedence of RFC 9110 section 13.2.2, steps 1 to 4."""
    if if_match is not None:
        # Step 1: strong comparison (13.1.1).
        if not _matches(if_match, etag, weak=False):
            return Precondition.FAILED
    elif if_unmodified_since is not None:
        # Step 2: only when If-Match is absent; an invalid date is ignored.
        since = http_date_to_epoch(if_unmodified_since)
        if since is not None and last_modified > since:
            return Precondition.FAILED
    if if_none_match is not None:
        # Step 3: weak comparison (13.1.2).
        if _matches(if_none_match, etag, weak=True):
            return Precondition.NOT_MODIFIED if method_is_get_or_head else Precondition.FAILED
    elif if_modified_since is not None and method_is_get_or_head:
        # Step 4: only when If-None-Match is absent.
        since = http_date_to_epoch(if_modified_since)
        if since is not None and last_modified <= since:
            return Precondition.NOT_MODIFIED
    return Precondition.PROCEED


def if_range_allows(if_range: str | None, etag: str, last_modified: int) -> bool:
    """Step 5 (13.1.5): True when the Range header may be honoured.

    An entity-tag must match strongly; a date must equal Last-Modified exactly. A weak tag
    never matches, so the client gets the whole, current representation.
    """
    if if_range is None:
        return True
    value = if_range.strip()
    if value.endswith('"'):
        return value == etag
    return http_date_to_epoch(value) == last_modified
