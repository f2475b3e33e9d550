"""Maps every refusal to a JSON body with the right status, in one place; and tells
edge.activity that a request came (`seen`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import hdrs, web

from nearvoice.edge import activity
from nearvoice.edge.errors import RequestError
from nearvoice.edge.http.protocol import RawAnswer, error_bytes

log = logging.getLogger("nearvoice.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: object
) -> web.Response:
    return web.json_response(
        {"error": code, "message": message, **extra}, status=status, headers=headers
    )


SPOKEN = frozenset({(1, 0), (1, 1)})
"""The HTTP versions this server speaks over its HTTP/1 framing."""


@web.middleware
async def seen(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request the app routes counts as traffic (edge.activity): a render whose
    request came among others' is not alone. The fast path's hits say so themselves
    (edge.http.fastpath)."""
    activity.RENDERS.request()
    return await handler(request)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    if tuple(request.version) not in SPOKEN:
        # aiohttp parses any `HTTP/d.d` and would echo it in the status line. RFC 9110
        # section 15.6.6: 505 for a major version not supported, said in HTTP/1.1.
        version = f"HTTP/{request.version.major}.{request.version.minor}"
        status = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED
        message = f"{version} is not spoken here; use HTTP/1.1"
        log.warning("rejected request from %s: 505 %s", request.remote, version)
        return RawAnswer(error_bytes(status, "http_version_not_supported", message, {}))
    try:
        return await handler(request)
    except RequestError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < HTTPStatus.BAD_REQUEST:
            raise
        headers: dict[str, str] = {}
        if exc.status == HTTPStatus.METHOD_NOT_ALLOWED and hdrs.ALLOW in exc.headers:
            headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        code = HTTPStatus(exc.status).phrase.lower().replace(" ", "_")
        return json_error(exc.status, code, exc.reason, headers)
    except ConnectionError:
        # The client went away mid-response; there is no one to answer.
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "internal error")
