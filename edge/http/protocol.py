"""A node's connection protocol: aiohttp's `RequestHandler` hardened for the open internet.

What aiohttp leaves to a reverse proxy, a node on the internet does itself:

* Requests aiohttp's parser rejects get the contract's JSON errors over HTTP/1.1 with the
  right status, not a text/plain HTTP/1.0 400: 414 for a request line over
  `max_line_size` (RFC 9110 section 15.5.15), 431 for a field or a header section over
  its limits (RFC 6585 section 5), 405 for a method the parser does not know (with Allow),
  400 for the rest (RFC 9112 section 3: NUL or obs-text in the target, bare LF, obs-fold).
  They are logged once at WARNING, without a traceback and at most
  `REJECTION_LOG_RATE` lines a second: a stream of garbage must not grow the log.
* A header timeout (`[http] header_timeout`): a client that starts a request head must
  finish it in time or get 408 (RFC 9110 section 15.5.9) and a closed connection; a
  slowloris connection sending a byte a second no longer lives forever.
* A cap on open connections per client address (`[http] max_connections_per_client`,
  per worker), with trusted proxies exempt (their connections carry many clients), and
  nodes of the tiers below once one of their requests carried a valid node signature.
* The PROXY protocol (edge.http.proxy_protocol) from trusted proxies when configured:
  the header is taken off before HTTP parsing and names the client (`peername`).

The aiohttp internals this relies on are listed, and checked at start-up, in
edge.http.aiohttp_private.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from nearvoice.edge.http import aiohttp_private, proxy_protocol
from nearvoice.edge.http.proxies import TrustedProxies

log = logging.getLogger("nearvoice.http")
REJECTION_LOG_RATE = 10.0  # WARNING lines a second for rejected requests, at most
ALLOWED = "GET, HEAD, POST"
MAX_NODE_PEERS = 1024  # addresses of node-signing tiers remembered for the connection cap


@dataclass(slots=True)
class Guard:
    """Per-listener state and settings shared by its connections."""

    trusted: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    proxy_protocol: bool = False
    header_timeout: float = 0.0
    max_connections_per_client: int = 0
    open_by_client: Counter[str] = field(default_factory=Counter)
    on_rejected: Any = None
    """Called with no arguments for each request refused before routing (metrics)."""
    node_peers: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Addresses that sent a valid node signature (tiers below): exempt from the
    per-client connection cap, as trusted proxies are. Bounded, oldest dropped first."""

    def exempt(self, peer: str | None) -> bool:
        return peer is not None and (peer in self.node_peers or self.trusted.trusts(peer))

    def mark_node_peer(self, peer: str | None) -> None:
        if peer is None:
            return
        self.node_peers[peer] = None
        self.node_peers.move_to_end(peer)
        if len(self.node_peers) > MAX_NODE_PEERS:
            self.node_peers.popitem(last=False)

    _log_tokens: float = REJECTION_LOG_RATE
    _log_stamp: float = 0.0
    _suppressed: int = 0

    def log_rejection(self, status: int, reason: str, peer: str | None) -> None:
        """One WARNING line, token-bucket limited; the count of lines left out goes with
        the next line that is written."""
        now = time.monotonic()
        self._log_tokens = min(
            REJECTION_LOG_RATE, self._log_tokens + (now - self._log_stamp) * REJECTION_LOG_RATE
        )
        self._log_stamp = now
        if self._log_tokens < 1:
            self._suppressed += 1
            return
        self._log_tokens -= 1
        suppressed, self._suppressed = self._suppressed, 0
        log.warning(
            "rejected request from %s: %d %s%s",
            peer,
            status,
            reason[:120],
            f" ({suppressed} more not logged)" if suppressed else "",
        )


def error_bytes(status: HTTPStatus, code: str, message: str, extra: dict[str, str]) -> bytes:
    """A complete HTTP/1.1 answer with the contract's JSON body, closing the connection."""
    body = json.dumps({"error": code, "message": message}).encode()
    fields = "".join(f"{name}: {value}\r\n" for name, value in extra.items())
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{fields}Connection: close\r\n"
        f"Date: {rfc822_formatted_time()}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def classify(
    exc: BaseException | None, max_line_size: int
) -> tuple[HTTPStatus, str, dict[str, str]]:
    """(status, code, extra header fields) for a request the parser refused."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (max_line_size,):
            return HTTPStatus.REQUEST_URI_TOO_LONG, "uri_too_long", {}
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header_fields_too_large", {}
    if isinstance(exc, BadHttpMethod):
        return HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", {"Allow": ALLOWED}
    if isinstance(exc, HttpProcessingError):
        if "Too many headers" in str(exc.message):
            return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header_fields_too_large", {}
        if exc.code and exc.code != HTTPStatus.BAD_REQUEST:
            try:
                status = HTTPStatus(exc.code)
            except ValueError:
                status = HTTPStatus.BAD_REQUEST
            return status, status.phrase.lower().replace(" ", "_"), {}
    return HTTPStatus.BAD_REQUEST, "bad_request", {}


class RawAnswer(web.StreamResponse):
    """Pre-serialised bytes written as they are, then the connection closes."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = data
        self.force_close()

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if not aiohttp_private.already_sent(self):
            transport = request.transport
            if transport is not None and not transport.is_closing():
                transport.write(self._data)
            aiohttp_private.mark_sent(self, request, keep_alive=False)
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class EdgeHandler(RequestHandler):
    __slots__ = ("_guard", "_head_bytes", "_head_timer", "_peer", "_proxied", "_proxy_buffer")

    def __init__(self, server: web.Server, guard: Guard, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._guard = guard
        self._peer: str | None = None
        self._proxied: str | None = None
        self._proxy_buffer: bytes | None = None
        """Bytes of a PROXY header received so far; None once it was read (or not due)."""
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    @property
    def peername(self) -> Any:
        """The PROXY header's client when there was one, else the socket's peer."""
        if self._proxied is not None:
            return (self._proxied, 0)
        return None if self.transport is None else self.transport.get_extra_info("peername")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, list | tuple) else None
        guard = self._guard
        trusted = guard.trusted.trusts(self._peer)
        if guard.proxy_protocol and trusted:
            self._proxy_buffer = b""
        if self._peer is not None and not guard.exempt(self._peer):
            guard.open_by_client[self._peer] += 1
            limit = guard.max_connections_per_client
            if limit and guard.open_by_client[self._peer] > limit:
                self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "too_many_connections",
                             f"more than {limit} open connections from one address")  # fmt: skip
                return
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        peer = self._peer
        guard = self._guard
        if peer is not None and peer in guard.open_by_client:
            guard.open_by_client[peer] -= 1
            if guard.open_by_client[peer] <= 0:
                del guard.open_by_client[peer]
        self._peer = None
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _refuse(self, status: HTTPStatus, code: str, message: str) -> None:
        transport = self.transport
        self._guard.log_rejection(status.value, code, self._peer)
        if self._guard.on_rejected is not None:
            self._guard.on_rejected()
        if transport is not None and not transport.is_closing():
            transport.write(error_bytes(status, code, message, {}))
        self.force_close()
        if transport is not None:
            transport.close()

    # -- the bytes -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._proxy_buffer is not None and data:
            buffer = self._proxy_buffer + data
            parsed = proxy_protocol.parse(buffer)
            if parsed is proxy_protocol.NEED_MORE:
                self._proxy_buffer = buffer
                return
            self._proxy_buffer = None
            if isinstance(parsed, proxy_protocol.ProxyError):
                self._refuse(HTTPStatus.BAD_REQUEST, "bad_proxy_header", parsed.reason)
                return
            assert isinstance(parsed, proxy_protocol.Proxied)
            self._proxied = parsed.client
            data = buffer[parsed.consumed :]
            if not data:
                return
        before = aiohttp_private.requests_seen(self)
        self.http_received(data)
        if aiohttp_private.requests_seen(self) != before:
            self._head_bytes = 0
            self._cancel_head_timer()
        elif data and (before == 0 or aiohttp_private.waiting_for_request(self)):
            # Before the first request or between requests: these bytes start a head that
            # is not complete yet.
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._arm_head_timer()

    def http_received(self, data: bytes) -> None:
        """HTTP bytes (after any PROXY header): aiohttp's parser by default."""
        RequestHandler.data_received(self, data)

    def _arm_head_timer(self) -> None:
        timeout = self._guard.header_timeout
        if timeout > 0 and self._head_timer is None:
            loop = aiohttp_private.loop_of(self)
            self._head_timer = loop.call_later(timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        seen = aiohttp_private.requests_seen(self)
        if self._head_bytes == 0 and seen:
            return  # idle between requests: keep-alive's business, not ours
        if not aiohttp_private.waiting_for_request(self) and seen:
            return  # a request is being answered
        if self._head_bytes == 0:
            # A connection opened and left silent (a preconnect, or a slowloris that never
            # starts): closed without a 408, which a client might take for the answer to
            # the request it is about to send.
            self.force_close()
            if self.transport is not None:
                self.transport.close()
            return
        self._refuse(
            HTTPStatus.REQUEST_TIMEOUT, "request_timeout", "the request head did not arrive in time"
        )

    # -- aiohttp's refusals ----------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == HTTPStatus.INTERNAL_SERVER_ERROR and not isinstance(exc, HttpProcessingError):
            log.error("unhandled error on %s", request.path, exc_info=exc)
            failed = HTTPStatus.INTERNAL_SERVER_ERROR
            return RawAnswer(error_bytes(failed, "internal_error", "internal error", {}))
        answer, code, extra = classify(exc, self.max_line_size)
        lines = str(getattr(exc, "message", "") or "").splitlines()
        self._guard.log_rejection(answer.value, lines[0] if lines else code, request.remote)
        if self._guard.on_rejected is not None:
            self._guard.on_rejected()
        return RawAnswer(error_bytes(answer, code, answer.phrase, extra))


def mark_node_peer(request: web.BaseRequest) -> None:
    """Records that `request`'s peer is a node of a tier below (a valid node signature)."""
    protocol = request.protocol
    if isinstance(protocol, EdgeHandler):
        protocol._guard.mark_node_peer(protocol._peer)
