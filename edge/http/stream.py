"""Answering from an object that is still being produced (an in-flight `Fill`).

Before its first byte a fill says whether it knows the object's length (edge.cache.fill).

Known length (a local render with a duration pass, or an upstream that declared it): every
request is answered exactly as for a stored object (edge.http.deliver: preconditions,
HEAD, If-Range, single and multiple ranges, 416 past the end), with the bytes sent as they
are produced, but one (below). A player opening with `Range: bytes=0-` gets
`206 bytes 0-(L-1)/L` at once, and a range past what exists so far waits only for its own
bytes (docs/contracts.md#exact-length-from-the-first-byte). A render that fails after the
headers aborts the connection: the client sees fewer bytes than the Content-Length it was
promised, never a padded or short object taken for whole.

The one exception is MP3 and Ogg Opus opened with `bytes=0-`: a player that learns an
MP3's size reads its last 128 bytes first (ffmpeg's ID3v1 probe; Chromium plays through
ffmpeg), and of an Ogg stream its last page (ffmpeg's duration probe); those exist only
once the render ends, so the player would wait for the whole render. That
request is answered as for an unknown length (a 200 streamed at once, below); the seeks
that follow get exact 206s.

Unknown length (an external engine, FLAC), where RFC 9110 section 14.4 would need `*`:

* GET without Range, unconditional: 200, the body streamed as it is produced.
* `Range: bytes=0-`, unconditional, as browsers and ffmpeg open media: also that 200. A
  server may ignore Range (RFC 9110 section 14.2), and this is the answer both real clients
  handle: Chromium accepts a 200 to a `bytes=0-` request and trusts `Accept-Ranges: bytes`
  for later seeks (which, once the object is complete, get exact 206s), and ffmpeg reads a
  200 to the end. The alternatives break one of them: a 206 with `bytes 0-N/*` is read by
  ffmpeg 5.1 as a size of 0 (it drops the rest of the audio), and waiting for the whole
  render puts the render between the player and its first sound.
* A bounded range `a-b`: wait until byte b exists, then 206 `bytes a-b/*` at once.
* Anything else (`bytes=N-` past 0, suffix ranges, several ranges, HEAD, conditional
  requests): wait for the object to finish and answer exactly, as for a cache hit. Never
  200 where 206 is possible (Varnish bug #4081).

If the producer fails after the headers went out, the connection is closed without the
final chunk (or short of the Content-Length), so the client sees a broken transfer rather
than a complete short object.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import Protocol

from aiohttp import hdrs, web

from nearvoice.edge.cache.fill import Fill, FillFailed
from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.http.deliver import (
    RANGE_UNIT,
    Delivered,
    DeliveryOptions,
    base_headers,
    check_preconditions,
    deliver,
    plan_ranges,
)
from nearvoice.edge.http.direct import DirectStream, can_answer_directly, serialize_headers
from nearvoice.edge.http.multipart import Multipart
from nearvoice.edge.http.ranges import ByteRange, RangeError, content_range, parse_range
from nearvoice.edge.policy import Policy

SEND_SLICE = 64 * 1024  # bytes per write: with drain, bounds what one slow listener buffers
FIRST_SLICE = 4 * 1024  # the first write is small, so every waiting listener gets a byte soon
_CONDITIONALS = (
    hdrs.IF_MATCH,
    hdrs.IF_NONE_MATCH,
    hdrs.IF_MODIFIED_SINCE,
    hdrs.IF_UNMODIFIED_SINCE,
    hdrs.IF_RANGE,
)
_UNBOUNDED = 1 << 62  # a length larger than any object, to parse ranges before it is known


def _streamable(request: web.BaseRequest) -> bool:
    if request.method != hdrs.METH_GET:
        return False
    return not any(name in request.headers for name in _CONDITIONALS)


def _plan(request: web.BaseRequest, max_ranges: int) -> tuple[int, int | None] | None:
    """(start, end) to stream, end None for open-ended; None to wait for the whole object."""
    header = request.headers.get(hdrs.RANGE)
    if header is None:
        return 0, None
    text = header.strip()
    if "," in text or text[len("bytes=") :].lstrip().startswith("-"):
        return None  # several ranges or a suffix: both need the complete length
    try:
        ranges = parse_range(text, _UNBOUNDED, max_ranges)
    except RangeError:
        return None  # the exact path will answer 416 with the real length
    if not ranges or len(ranges) != 1:
        return None
    start, end = ranges[0]
    if end == _UNBOUNDED:
        # `bytes=0-` is the whole object: streamed as a 200 (see above). Past 0, the
        # answer needs the length: given exactly once it is known.
        return (0, None) if start == 0 else None
    return start, end


TAIL_PROBED = frozenset({"audio/mpeg", "audio/ogg;codecs=opus"})
"""Types whose players read the end of an object of known size before they play, and
those bytes exist only when the render ends: ffmpeg (and so Chromium) looks for an ID3v1
tag in an MP3's last 128 bytes, and reads an Ogg stream's last page for its duration (the
last granule position), as soon as it knows the size."""


def _tail_first(request: web.BaseRequest, fill: Fill) -> bool:
    """Whether to answer as for an unknown length: a player opening a tail-probed object
    with `bytes=0-` gets the whole of it streamed as a 200 with no size (see the module
    docstring), so it starts on the first chunk instead of waiting for the last bytes.
    Every other request on the object is still answered exactly."""
    return (
        fill.content_type in TAIL_PROBED
        and _streamable(request)
        and request.headers.get(hdrs.RANGE, "").replace(" ", "") == "bytes=0-"
    )


async def deliver_fill(
    request: web.BaseRequest, fill: Fill, policy: Policy, options: DeliveryOptions
) -> Delivered:
    """Answers `request` from `fill`, streaming while it runs. Raises FillFailed when the
    fill fails before anything was sent."""
    await fill.until_sized()
    length = fill.length
    # A HEAD once every byte exists is waited out: the commit, which is what computes the
    # digest a fetching node confirms with its HEAD (edge.upstream), is moments away.
    complete = request.method == hdrs.METH_HEAD and length is not None and fill.size >= length
    if fill.is_running() and length is not None and not complete and not _tail_first(request, fill):
        return await _deliver_sized(request, fill, length, policy, options)
    plan = _plan(request, options.max_ranges) if _streamable(request) else None
    if plan is None or not fill.is_running():
        return await _deliver_complete(request, fill, policy, options)
    await fill.until_started()
    start, end = plan
    # Wait for the first requested byte (for a bounded range, the last one) to exist.
    await fill.until_size(end if end is not None else start + 1)
    if not fill.is_running():
        return await _deliver_complete(request, fill, policy, options)

    assert fill.content_type is not None and fill.etag is not None
    headers: dict[str, str] = {
        hdrs.ETAG: fill.etag,
        hdrs.CACHE_CONTROL: policy.cache_control,
        hdrs.ACCEPT_RANGES: RANGE_UNIT,
        hdrs.CONTENT_TYPE: fill.content_type,
    }
    status = HTTPStatus.OK
    if end is not None:  # a bounded range; `bytes=0-` streams as the whole object
        status = HTTPStatus.PARTIAL_CONTENT
        headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/*"
    length = None if end is None else end - start
    return await _pump(_sink(request, options, status, headers, length), fill, [(start, end)])


async def _deliver_complete(
    request: web.BaseRequest, fill: Fill, policy: Policy, options: DeliveryOptions
) -> Delivered:
    meta = await fill.until_done()
    return await deliver(request, meta, policy, body=fill.body(), file=None, options=options)


async def _deliver_sized(
    request: web.BaseRequest, fill: Fill, length: int, policy: Policy, options: DeliveryOptions
) -> Delivered:
    """The answer a stored object of `length` bytes would get, its body sent as produced."""
    assert fill.content_type is not None and fill.etag is not None
    meta = ObjectMeta(
        key=fill.key,
        content_type=fill.content_type,
        length=length,
        etag=fill.etag,
        sha256="",  # unknown until the end: in-flight answers carry no digest
        policy=policy,
        stored_at=fill.started_at,  # what the stored object's Last-Modified will say
        ttl=0,
    )
    not_modified = check_preconditions(request, meta, policy)
    if not_modified is not None:
        return Delivered(not_modified, 0)
    ranges = plan_ranges(request, meta, options.max_ranges)
    headers = dict(base_headers(meta, policy))
    parts: list[bytes | tuple[int, int | None]]
    if len(ranges) > 1:
        multipart = Multipart.plan(ranges, meta.content_type, length)
        headers[hdrs.CONTENT_TYPE] = multipart.header_value
        status, body_length = HTTPStatus.PARTIAL_CONTENT, multipart.body_length
        parts = [piece for head, span in multipart.pieces() for piece in (head, span)]
        parts.append(multipart.tail)
    else:
        headers[hdrs.CONTENT_TYPE] = meta.content_type
        span: ByteRange = ranges[0] if ranges else (0, length)
        status = HTTPStatus.PARTIAL_CONTENT if ranges else HTTPStatus.OK
        if ranges:
            headers[hdrs.CONTENT_RANGE] = content_range(span, length)
        body_length = span[1] - span[0]
        parts = [span]
    if request.method == hdrs.METH_HEAD:
        # RFC 9110 section 9.3.2: the headers GET would send, Content-Length included.
        headers[hdrs.CONTENT_LENGTH] = str(body_length)
        return Delivered(web.Response(status=status, headers=headers), 0)
    return await _pump(_sink(request, options, status, headers, body_length), fill, parts)


def _sink(
    request: web.BaseRequest,
    options: DeliveryOptions,
    status: HTTPStatus,
    headers: dict[str, str],
    length: int | None,
) -> _Sink:
    if options.direct and can_answer_directly(request):
        return _DirectSink(request, DirectStream(status, serialize_headers(headers), length))
    return _AiohttpSink(request, status, headers, length)


class _Sink(Protocol):
    response: web.StreamResponse

    @property
    def started(self) -> bool:
        """Whether the head has gone out (with the first send)."""
        ...

    async def send(self, data: memoryview) -> None: ...

    async def finish(self) -> None: ...

    def abort(self) -> None: ...


class _DirectSink:
    def __init__(self, request: web.BaseRequest, stream: DirectStream) -> None:
        self.request = request
        self.stream = stream
        self.response: web.StreamResponse = stream
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    async def send(self, data: memoryview) -> None:
        self._started = True
        await self.stream.send(self.request, data)

    async def finish(self) -> None:
        await self.stream.finish(self.request)

    def abort(self) -> None:
        self.stream.abort(self.request)


class _AiohttpSink:
    """aiohttp's own StreamResponse, for HTTP/1.0 and `Connection: close` exchanges."""

    def __init__(
        self, request: web.BaseRequest, status: int, headers: dict[str, str], length: int | None
    ) -> None:
        self.request = request
        self.response = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            self.response.content_length = length

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def send(self, data: memoryview) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(data)

    async def finish(self) -> None:
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


async def _pump(sink: _Sink, fill: Fill, parts: list[bytes | tuple[int, int | None]]) -> Delivered:
    """Sends `parts` in order: framing bytes as they are, `(start, end)` spans of the
    object as the fill produces them (`end` None: to its end)."""
    sent = 0
    first_byte = None
    try:
        for part in parts:
            if isinstance(part, bytes):
                await sink.send(memoryview(part))
                continue
            async for view in fill.read(*part):
                offset = 0
                while offset < len(view):
                    size = SEND_SLICE if first_byte is not None else FIRST_SLICE
                    # Both sinks wait for the socket to drain past its high-water mark, so
                    # a slow listener holds about one slice, not a whole sentence.
                    await sink.send(view[offset : offset + size])
                    offset += size
                    if first_byte is None:
                        first_byte = time.perf_counter()
                    # Listeners of one fill wake together; take turns slice by slice, so
                    # the first one woken does not send a whole sentence while the others
                    # wait.
                    await asyncio.sleep(0)
                sent += len(view)
    except FillFailed:
        if not sink.started:
            raise  # nothing went out: the caller answers with the error (or a stale copy)
        # The headers are gone: end the connection without the final chunk, so the client
        # knows the body is incomplete rather than taking a short one for the whole.
        sink.abort()
        return Delivered(sink.response, sent, first_byte)
    await sink.finish()
    return Delivered(sink.response, sent, first_byte)
