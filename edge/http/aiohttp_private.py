"""Every private aiohttp internal the node relies on, named in one place, with a
start-up self-check.

The fast path (edge.http.fastpath), the hardened protocol (edge.http.protocol), the direct
answers (edge.http.direct) and sendfile (edge.http.sendfile) reach beneath aiohttp's
public API: the request handler's idle waiter, message queue, pause flags and keep-alive
deadline; its `handle_error` hook; the response's end-of-stream flags and the request's
payload writer; the server's assembled keyword arguments. aiohttp does not promise any of
these, so every read or write of them goes through the accessors at the end of this
module, and nowhere else. `problems()` inspects a real handler, response and server of the installed
aiohttp for every name below (and the signatures we override); `compatible()` is what
the node asks at start-up: when anything moved, the node logs what and serves on
aiohttp's ordinary, public path instead (no fast path, no direct answers, aiohttp's own
protocol), slower but correct. The tests fail loudly on the same check, so a version
bump shows what to adapt.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("nearvoice.http")

HANDLER_ATTRIBUTES = (
    "_waiter", "_messages", "_paused", "_buffer_paused", "_reading_paused", "_close",
    "_force_close", "_upgraded", "_payload_parser", "_request_count", "_keepalive_timeout",
    "_next_keepalive_close_time", "_keepalive_handle", "_loop", "max_line_size",
    "max_field_size", "access_logger",
)  # fmt: skip
"""RequestHandler instance attributes read or written by edge.http.fastpath/protocol."""
HANDLER_METHODS = ("_process_keepalive", "handle_error", "data_received", "force_close")
RESPONSE_ATTRIBUTES = ("_eof_sent", "_keep_alive", "_payload_writer")
"""StreamResponse attributes set by edge.http.direct and edge.http.protocol.RawAnswer."""
SERVER_ATTRIBUTES = ("_kwargs", "_loop", "requests_count", "request_factory", "request_handler")
HANDLE_ERROR_PARAMETERS = ("request", "status", "exc", "message")


def problems() -> list[str]:
    """What the installed aiohttp lacks of what the node uses; empty when all is there."""
    found: list[str] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    loop = asyncio.new_event_loop()
    try:
        server = web.Server(handler, loop=loop)
        protocol = RequestHandler(server, loop=loop)
        found += [f"RequestHandler.{n}" for n in HANDLER_ATTRIBUTES if not hasattr(protocol, n)]
        found += [f"RequestHandler.{n}()" for n in HANDLER_METHODS if not hasattr(protocol, n)]
        found += [f"Server.{n}" for n in SERVER_ATTRIBUTES if not hasattr(server, n)]
    except Exception as exc:
        found.append(f"constructing a RequestHandler: {type(exc).__name__}: {exc}")
    finally:
        loop.close()
    response = web.StreamResponse()
    found += [f"StreamResponse.{n}" for n in RESPONSE_ATTRIBUTES if not hasattr(response, n)]
    if "_payload_writer" not in getattr(web.BaseRequest, "ATTRS", ()):
        found.append("BaseRequest._payload_writer")
    params = tuple(inspect.signature(RequestHandler.handle_error).parameters)[1:]
    if params != HANDLE_ERROR_PARAMETERS:
        found.append(f"RequestHandler.handle_error{params}")
    too_long = http_exceptions.LineTooLong("x", 5)
    if too_long.args[1:2] != (5,):
        found.append("LineTooLong.args no longer carries the limit")
    if not hasattr(web.AppRunner, "_make_server"):
        found.append("AppRunner._make_server")
    return found


@functools.cache
def compatible() -> bool:
    """`problems()` is empty; logged once per process when it is not."""
    missing = problems()
    if missing:
        log.warning(
            "aiohttp internals changed (%s): serving without the fast path, direct answers "
            "and the hardened protocol",
            ", ".join(missing),
        )
    return not missing


# -- the accessors: every read or write of a private name goes through one of these --------


def idle(handler: RequestHandler) -> bool:
    """aiohttp's request loop on `handler` waits for the next message and owes no
    answer: nothing queued or half-parsed, reading and writing not paused (so answers stay
    in order and back-pressure stays aiohttp's), and the transport open."""
    waiter = handler._waiter
    transport = handler.transport
    return (
        waiter is not None
        and not waiter.done()
        and not handler._messages
        and not handler._paused
        and not handler._buffer_paused
        and not handler._reading_paused
        and not handler._close
        and not handler._force_close
        and not handler._upgraded
        and handler._payload_parser is None
        and transport is not None
        and not transport.is_closing()
    )


def waiting_for_request(handler: RequestHandler) -> bool:
    """The request loop waits for a message (no request is being handled)."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


def requests_seen(handler: RequestHandler) -> int:
    """Messages the parser has produced on this connection (refusals included)."""
    return handler._request_count


def loop_of(handler: RequestHandler | web.Server) -> asyncio.AbstractEventLoop:
    return handler._loop


def answered_keepalive(handler: RequestHandler, server: web.Server) -> None:
    """What aiohttp's request loop does after a keep-alive answer it did not write itself:
    count it and move the idle connection's deadline (its timer reschedules itself)."""
    handler._request_count += 1
    server.requests_count += 1
    loop = handler._loop
    close_time = loop.time() + handler._keepalive_timeout
    handler._next_keepalive_close_time = close_time
    if handler._keepalive_handle is None:
        handler._keepalive_handle = loop.call_at(close_time, handler._process_keepalive)


def server_kwargs(server: web.Server) -> dict[str, Any]:
    """The keyword arguments aiohttp assembled for `server`'s connections."""
    return dict(server._kwargs)


def payload_writer(request: web.BaseRequest) -> AbstractStreamWriter:
    """The request's stream writer (for `drain`: aiohttp's back-pressure)."""
    writer: AbstractStreamWriter = request._payload_writer
    return writer


def mark_sent(response: web.StreamResponse, request: web.BaseRequest, keep_alive: bool) -> None:
    """Tells aiohttp that `response` was written in full straight to the transport."""
    response._eof_sent = True
    response._keep_alive = keep_alive
    response._payload_writer = request._payload_writer


def already_sent(response: web.StreamResponse) -> bool:
    return bool(response._eof_sent)
