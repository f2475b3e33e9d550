"""The direct answer: the hottest responses written to the transport in one call.

A GET for an object held in memory that ends in 200 or a single-range 206 on an HTTP/1.1
keep-alive connection is the cache's bread and butter. aiohttp's generic response path
(a header multidict, preparation hooks, serialisation, and a copy that joins headers and
body, since aiohttp skips writelines on Python 3.11) costs more than everything else such
a hit does. `DirectResponse` instead writes a head pre-serialised from cached per-object
headers and a zero-copy view of the body with one `writelines` (a single writev on uvloop),
then tells aiohttp the exchange is complete. Everything else (HEAD, multipart, files,
HTTP/1.0, `Connection: close`, access logging) takes the ordinary path.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from nearvoice.edge.http import aiohttp_private

_REASONS = {
    status: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()


def can_answer_directly(request: web.BaseRequest) -> bool:
    """True when nothing about the connection needs aiohttp's generic handling."""
    return request.version == HttpVersion11 and request.keep_alive


def direct_head(status: HTTPStatus, fixed: bytes, varying: bytes) -> bytes:
    """The status line and header section of a direct answer: the per-object block,
    this answer's own lines, then Server and Date, as aiohttp would add them."""
    return head_without_date(status, fixed, varying) + date_line()


def head_without_date(status: HTTPStatus, fixed: bytes, varying: bytes) -> bytes:
    """`direct_head` up to its Date line, which `date_line` gives."""
    return b"".join((_REASONS[status], fixed, varying, _SERVER))


_date: tuple[str, bytes] = ("", b"")


def date_line() -> bytes:
    """`Date: ...` and the blank line ending a head; made again only when the second
    (aiohttp's formatted time, cached per second) changes."""
    global _date
    now = rfc822_formatted_time()
    if now != _date[0]:
        _date = (now, f"Date: {now}\r\n\r\n".encode("latin-1"))
    return _date[1]


def serialize_headers(headers: dict[str, str]) -> bytes:
    """`Name: value` lines; values come from our own metadata, never from a client."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("latin-1")


class DirectResponse(web.StreamResponse):
    def __init__(
        self, status: HTTPStatus, fixed: bytes, varying: bytes, payload: memoryview | bytes
    ) -> None:
        """`fixed` is the per-object header block; `varying` holds this answer's own
        Content-Range and Content-Length lines."""
        super().__init__(status=status)
        self._head_parts = (status, fixed, varying)
        self._payload = payload
        self.body_bytes = len(payload)
        """Body bytes sent, for the access log (edge.http.logs)."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if aiohttp_private.already_sent(self):
            return None
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost before the response")
        transport.writelines((direct_head(*self._head_parts), self._payload))
        aiohttp_private.mark_sent(self, request, keep_alive=True)
        writer = aiohttp_private.payload_writer(request)
        # Back-pressure, as aiohttp's own writer applies it: wait while the transport is
        # paused above its high-water mark, so a slow reader cannot make us buffer without
        # bound across pipelined requests.
        await writer.drain()
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class DirectStream(web.StreamResponse):
    """A streamed answer written straight to the transport: the in-flight counterpart of
    `DirectResponse`. When the first bytes of an object being rendered appear, every
    listener waiting for it must get them at once; the head is serialised once per fill and
    each send is one `writelines`, with chunked framing (RFC 9112 section 7.1) unless the
    length is known. Back-pressure comes from aiohttp's own drain."""

    def __init__(self, status: HTTPStatus, fields: bytes, length: int | None) -> None:
        """`fields` is the serialised header block; `length` None means chunked."""
        super().__init__(status=status)
        framing = b"Transfer-Encoding: chunked\r\n" if length is None else b""
        length_line = b"" if length is None else f"Content-Length: {length}\r\n".encode()
        self._head_parts = (_REASONS[status], fields, framing + length_line)
        self._chunked = length is None
        self._request: web.BaseRequest | None = None

    async def send(self, request: web.BaseRequest, data: bytes | memoryview) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        parts: list[bytes | memoryview] = []
        if self._request is None:
            self._request = request
            status_line, fields, framing = self._head_parts
            date = f"Date: {rfc822_formatted_time()}\r\n\r\n".encode("latin-1")
            parts.append(b"".join((status_line, fields, framing, _SERVER, date)))
        if self._chunked:
            parts += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            parts.append(data)
        transport.writelines(parts)
        await aiohttp_private.payload_writer(request).drain()

    async def finish(self, request: web.BaseRequest) -> None:
        if self._chunked and request.transport is not None:
            request.transport.write(b"0\r\n\r\n")
        self._end(request, keep_alive=True)

    def abort(self, request: web.BaseRequest) -> None:
        """Ends the exchange without the final chunk: the client sees a broken body."""
        if request.transport is not None:
            request.transport.close()
        self._end(request, keep_alive=False)

    def _end(self, request: web.BaseRequest, keep_alive: bool) -> None:
        aiohttp_private.mark_sent(self, request, keep_alive)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        return None  # everything was written by send/finish/abort

    async def write_eof(self, data: bytes = b"") -> None:
        return None
