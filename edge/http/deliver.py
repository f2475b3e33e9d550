"""Delivering a complete object: preconditions, Range, and the body from memory or a file.

The steps follow RFC 9110 section 13.2.2: preconditions first (412/304), then If-Range,
then Range (206, multipart 206, or 416), else 200.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus

from aiohttp import hdrs, web

from nearvoice.edge.cache.hot import SharedFile
from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.errors import PreconditionFailed, RangeNotSatisfiable
from nearvoice.edge.http.conditional import Precondition, evaluate, if_range_allows
from nearvoice.edge.http.direct import DirectResponse, can_answer_directly, serialize_headers
from nearvoice.edge.http.multipart import Multipart
from nearvoice.edge.http.ranges import (
    ByteRange,
    RangeError,
    content_range,
    parse_range,
    unsatisfied_range,
)
from nearvoice.edge.http.sendfile import send_file_range
from nearvoice.edge.policy import Policy
from nearvoice.edge.upstream import CHECKSUM_HEADER

RANGE_UNIT = "bytes"


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    max_ranges: int
    use_sendfile: bool
    direct: bool = True
    """Answer in-memory 200/206 hits with `DirectResponse` (off when access logging)."""


@dataclass(slots=True)
class Delivered:
    response: web.StreamResponse
    body_bytes: int
    first_byte: float | None = None
    """perf_counter() when the first body byte was written, if the handler wrote it."""


def http_date(epoch: float) -> str:
    return formatdate(epoch, usegmt=True)


@lru_cache(maxsize=4096)
def base_headers(meta: ObjectMeta, policy: Policy) -> dict[str, str]:
    """The headers every answer about `meta` carries. Downstream caching follows the
    policy of the URL being answered (docs/contracts.md#signed-urls), not the one the object was
    stored under. Cached: objects are immutable, and formatting the date is a visible cost
    on the hit path. Callers must copy, not mutate.

    `CHECKSUM_HEADER` is the digest of the complete object (a representation digest, like
    RFC 9530's Repr-Digest), so 200, 206, 304 and HEAD answers all carry it, players'
    included: one cached header set for everyone, and the digest reveals nothing the bytes
    do not. Answers about an object still in flight (edge.http.stream) cannot: their
    `meta.sha256` is empty and the header is left out."""
    headers: dict[str, str] = {
        hdrs.ETAG: meta.etag,
        hdrs.LAST_MODIFIED: http_date(meta.last_modified),
        hdrs.CACHE_CONTROL: policy.cache_control,
        hdrs.ACCEPT_RANGES: RANGE_UNIT,
    }
    if meta.sha256:
        headers[CHECKSUM_HEADER] = meta.sha256
    return headers


@lru_cache(maxsize=4096)
def fixed_head(meta: ObjectMeta, policy: Policy) -> bytes:
    """`base_headers` plus Content-Type, serialised once for direct answers."""
    headers = dict(base_headers(meta, policy))
    headers[hdrs.CONTENT_TYPE] = meta.content_type
    return serialize_headers(headers)


def plan_ranges(request: web.BaseRequest, meta: ObjectMeta, max_ranges: int) -> list[ByteRange]:
    """The ranges to send; empty for the whole body. Raises 416 as a RequestError."""
    header = request.headers.get(hdrs.RANGE)
    # RFC 9110 section 14.2: range handling is defined for GET only.
    if header is None or request.method != hdrs.METH_GET:
        return []
    if not if_range_allows(request.headers.get(hdrs.IF_RANGE), meta.etag, meta.last_modified):
        return []
    try:
        ranges = parse_range(header, meta.length, max_ranges)
    except RangeError as exc:
        raise RangeNotSatisfiable(
            "range_not_satisfiable",
            str(exc),
            headers={hdrs.CONTENT_RANGE: unsatisfied_range(meta.length)},
        ) from exc
    return ranges or []


def check_preconditions(
    request: web.BaseRequest, meta: ObjectMeta, policy: Policy
) -> web.Response | None:
    """A 304 to send instead of the object, None to go on; raises 412."""
    h = request.headers
    outcome = evaluate(
        method_is_get_or_head=request.method in (hdrs.METH_GET, hdrs.METH_HEAD),
        etag=meta.etag,
        last_modified=meta.last_modified,
        if_match=h.get(hdrs.IF_MATCH),
        if_none_match=h.get(hdrs.IF_NONE_MATCH),
        if_modified_since=h.get(hdrs.IF_MODIFIED_SINCE),
        if_unmodified_since=h.get(hdrs.IF_UNMODIFIED_SINCE),
    )
    if outcome is Precondition.FAILED:
        raise PreconditionFailed("precondition_failed", "a precondition did not hold")
    if outcome is Precondition.NOT_MODIFIED:
        # RFC 9110 section 15.4.5: a 304 repeats the validators and Cache-Control.
        headers = dict(base_headers(meta, policy))
        return web.Response(status=HTTPStatus.NOT_MODIFIED, headers=headers)
    return None


def direct_parts(
    meta: ObjectMeta, policy: Policy, body: bytes, ranges: list[ByteRange]
) -> tuple[HTTPStatus, bytes, bytes, memoryview | bytes]:
    """A 200 (no ranges) or single-range 206 about an in-memory object, as the parts of
    `DirectResponse`: status, the per-object header block, this answer's own
    Content-Range and Content-Length lines, and a zero-copy view of the body. The fast
    path (edge.http.fastpath) writes the very same parts."""
    payload: memoryview | bytes
    if ranges:
        start, end = ranges[0]
        varying = (
            f"Content-Range: {content_range(ranges[0], meta.length)}\r\n"
            f"Content-Length: {end - start}\r\n"
        )
        payload = memoryview(body)[start:end]
        status = HTTPStatus.PARTIAL_CONTENT
    else:
        varying = f"Content-Length: {meta.length}\r\n"
        payload, status = body, HTTPStatus.OK
    return status, fixed_head(meta, policy), varying.encode("latin-1"), payload


def _direct(meta: ObjectMeta, policy: Policy, body: bytes, ranges: list[ByteRange]) -> Delivered:
    status, fixed, varying, payload = direct_parts(meta, policy, body, ranges)
    return Delivered(DirectResponse(status, fixed, varying, payload), len(payload))


async def deliver(
    request: web.BaseRequest,
    meta: ObjectMeta,
    policy: Policy,
    *,
    body: bytes | None,
    file: SharedFile | None,
    options: DeliveryOptions,
    age: int | None = None,
) -> Delivered:
    """Answers `request` with `meta`'s object, held in `body` or open as `file`, under the
    requesting URL's `policy`."""
    not_modified = check_preconditions(request, meta, policy)
    if not_modified is not None:
        return Delivered(not_modified, 0)
    ranges = plan_ranges(request, meta, options.max_ranges)
    head_only = request.method == hdrs.METH_HEAD
    if (
        body is not None
        and age is None
        and len(ranges) <= 1
        and options.direct
        and not head_only
        and can_answer_directly(request)
    ):
        return _direct(meta, policy, body, ranges)
    headers = dict(base_headers(meta, policy))
    if age is not None:
        # RFC 9111 section 5.1: a stale answer says how old it is.
        headers[hdrs.AGE] = str(age)

    if len(ranges) > 1:
        multipart = Multipart.plan(ranges, meta.content_type, meta.length)
        headers[hdrs.CONTENT_TYPE] = multipart.header_value
        status, length = HTTPStatus.PARTIAL_CONTENT, multipart.body_length
    elif ranges:
        multipart = None
        headers[hdrs.CONTENT_TYPE] = meta.content_type
        headers[hdrs.CONTENT_RANGE] = content_range(ranges[0], meta.length)
        status, length = HTTPStatus.PARTIAL_CONTENT, ranges[0][1] - ranges[0][0]
    else:
        multipart = None
        headers[hdrs.CONTENT_TYPE] = meta.content_type
        status, length = HTTPStatus.OK, meta.length
        ranges = [(0, meta.length)]

    if body is not None:
        # From memory: one buffer, one write.
        if head_only:
            # RFC 9110 section 9.3.2: the headers GET would send, Content-Length included
            # (aiohttp derives it from a body only when the body is non-empty).
            headers[hdrs.CONTENT_LENGTH] = str(length)
            return Delivered(web.Response(status=status, headers=headers), 0)
        if multipart is None:
            start, end = ranges[0]
            payload = body[start:end] if (start, end) != (0, meta.length) else body
        else:
            out = bytearray()
            for head, (start, end) in multipart.pieces():
                out += head
                out += body[start:end]
            out += multipart.tail
            payload = bytes(out)
        return Delivered(web.Response(status=status, headers=headers, body=payload), length)

    assert file is not None
    stream = web.StreamResponse(status=status, headers=headers)
    stream.content_length = length
    writer = await stream.prepare(request)
    if head_only or writer is None:
        await stream.write_eof()
        return Delivered(stream, 0)
    use_sendfile = options.use_sendfile
    try:
        if multipart is None:
            start, end = ranges[0]
            await send_file_range(
                request, writer, file.fd, start, end - start, use_sendfile=use_sendfile
            )
        else:
            for head, (start, end) in multipart.pieces():
                await writer.write(head)
                await send_file_range(
                    request, writer, file.fd, start, end - start, use_sendfile=use_sendfile
                )
            await writer.write(multipart.tail)

    except OSError:
        # The headers are gone, so there is no answering with an error: close the
        # connection, and the client sees a short body rather than a hung one.
        if request.transport is not None:
            request.transport.close()
        return Delivered(stream, 0)
    await stream.write_eof()
    return Delivered(stream, length)
