"""Answering from an object that is still being produced (an in-flight `Fill`).

The complete length is unknown until the producer finishes, so (RFC 9110 section 14.4) a
partial response states it as `*`:

* GET without Range, unconditional: 200, the body streamed as it is produced.
* A bounded range `a-b`: wait until byte b exists, then 206 `bytes a-b/*` at once.
* An open-ended range `a-` (players open with `bytes=0-`, ffmpeg seeks with `bytes=N-`):
  wait for the object to finish, then 206 with the real length. Never 200 where 206 is
  possible (Varnish bug #4081). Streaming it as `bytes a-L/*` with a huge L (RFC 8673)
  was tried and broke real players: ffmpeg 5.1 reads `/*` as a size of 0 and silently
  drops the rest of the audio. A 1-2 sentence render finishes within tens of
  milliseconds, so the wait is short; a plain GET still streams from the first sentence.
* Anything else (suffix ranges, several ranges, HEAD, conditional requests): wait for the
  object to finish and answer exactly, as for a cache hit.

If the producer fails after the headers went out, the connection is closed without the
final chunk, so the client sees a broken transfer rather than a complete short object.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import Protocol

from aiohttp import hdrs, web

from edge.cache.fill import Fill, FillFailed
from edge.http.deliver import RANGE_UNIT, Delivered, DeliveryOptions, deliver
from edge.http.direct import DirectStream, can_answer_directly, serialize_headers
from edge.http.ranges import RangeError, parse_range
from edge.policy import Policy

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
        return None  # open-ended: answered exactly once the length is known (see above)
    return start, end


async def deliver_fill(
    request: web.BaseRequest, fill: Fill, policy: Policy, options: DeliveryOptions, etag: str
) -> Delivered:
    """Answers `request` from `fill`, streaming while it runs. Raises FillFailed when the
    fill fails before anything was sent."""
    plan = _plan(request, options.max_ranges) if _streamable(request) else None
    if plan is None or not fill.is_running():
        meta = await fill.until_done()
        return await deliver(request, meta, policy, body=fill.body(), file=None, options=options)
    await fill.until_started()
    start, end = plan
    # Wait for the first requested byte (for a bounded range, the last one) to exist.
    await fill.until_size(end if end is not None else start + 1)
    if not fill.is_running():
        meta = await fill.until_done()
        return await deliver(request, meta, policy, body=fill.body(), file=None, options=options)

    assert fill.content_type is not None
    headers: dict[str, str] = {
        hdrs.ETAG: etag,
        hdrs.CACHE_CONTROL: policy.cache_control,
        hdrs.ACCEPT_RANGES: RANGE_UNIT,
        hdrs.CONTENT_TYPE: fill.content_type,
    }
    status = HTTPStatus.OK
    if hdrs.RANGE in request.headers:
        status = HTTPStatus.PARTIAL_CONTENT
        assert end is not None  # only bounded ranges stream
        headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/*"
    length = None if end is None else end - start
    sink: _Sink
    if options.direct and can_answer_directly(request):
        sink = _DirectSink(request, DirectStream(status, serialize_headers(headers), length))
    else:
        sink = _AiohttpSink(request, status, headers, length)
    return await _pump(sink, fill, start, end)


class _Sink(Protocol):
    response: web.StreamResponse

    async def send(self, data: memoryview) -> None: ...

    async def finish(self) -> None: ...

    def abort(self) -> None: ...


class _DirectSink:
    def __init__(self, request: web.BaseRequest, stream: DirectStream) -> None:
        self.request = request
        self.stream = stream
        self.response: web.StreamResponse = stream

    async def send(self, data: memoryview) -> None:
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

    async def send(self, data: memoryview) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(data)

    async def finish(self) -> None:
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


async def _pump(sink: _Sink, fill: Fill, start: int, end: int | None) -> Delivered:
    sent = 0
    first_byte = None
    try:
        async for view in fill.read(start, end):
            offset = 0
            while offset < len(view):
                size = SEND_SLICE if first_byte is not None else FIRST_SLICE
                # Both sinks wait for the socket to drain past its high-water mark, so a
                # slow listener holds about one slice, not a whole sentence.
                await sink.send(view[offset : offset + size])
                offset += size
                if first_byte is None:
                    first_byte = time.perf_counter()
                # Listeners of one fill wake together; take turns slice by slice, so the
                # first one woken does not send a whole sentence while the others wait.
                await asyncio.sleep(0)
            sent += len(view)
    except FillFailed:
        # The headers are gone: end the connection without the final chunk, so the client
        # knows the body is incomplete rather than taking a short one for the whole.
        sink.abort()
        return Delivered(sink.response, sent, first_byte)
    await sink.finish()
    return Delivered(sink.response, sent, first_byte)
