"""Typed request errors. Each carries its HTTP status and a stable machine-readable code;
`edge.http.middleware` turns them into JSON responses in one place."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any


class RequestError(Exception):
    """A request the node refuses. `code` is the JSON `error` field clients match on."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message or code.replace("_", " ")
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BadRequest(RequestError):
    status = HTTPStatus.BAD_REQUEST


class Unauthorized(RequestError):
    status = HTTPStatus.UNAUTHORIZED


class Forbidden(RequestError):
    status = HTTPStatus.FORBIDDEN


class NotFound(RequestError):
    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(RequestError):
    status = HTTPStatus.METHOD_NOT_ALLOWED


class Gone(RequestError):
    status = HTTPStatus.GONE


class PreconditionFailed(RequestError):
    status = HTTPStatus.PRECONDITION_FAILED


class PayloadTooLarge(RequestError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class RangeNotSatisfiable(RequestError):
    status = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE


class TooManyRequests(RequestError):
    status = HTTPStatus.TOO_MANY_REQUESTS


class ServiceUnavailable(RequestError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class BadGateway(RequestError):
    status = HTTPStatus.BAD_GATEWAY


class GatewayTimeout(RequestError):
    status = HTTPStatus.GATEWAY_TIMEOUT
