"""Small request helpers shared by the admin and minting APIs.

JSON bodies are depth-checked before they are parsed: Python's `json` recurses once per
nested array or object, so a body of a few kilobytes of `[` would otherwise end in a
RecursionError (a 500) instead of a 400. RFC 8259 section 9 lets a parser limit nesting.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import hdrs, web

from nearvoice.edge.errors import BadRequest, Forbidden, Unauthorized

BEARER = "Bearer "
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have; the APIs' own bodies
need three levels."""


def json_depth(raw: bytes | str) -> int:
    """The deepest nesting of `[` and `{` in a JSON text, brackets inside strings aside.
    Linear in the text and recursion-free, so it is safe on any input."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def loads_bounded(raw: bytes | str, code: str = "bad_json") -> Any:
    """`json.loads`, with 400 `code` for text that is not JSON or nests too deeply."""
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise BadRequest(code, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(code, "body is not JSON") from exc


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or 400 `bad_json`."""
    return loads_bounded(await request.read())


def _token_bytes(value: str) -> bytes:
    """A header value as the bytes that came on the wire: aiohttp decodes header bytes
    as UTF-8 with surrogate escapes, so a value that is not UTF-8 round-trips here
    instead of raising UnicodeEncodeError."""
    return value.encode("utf-8", "surrogateescape")


def require_bearer(request: web.Request, token: str | None, *, env: str, realm: str) -> None:
    """Checks `Authorization: Bearer <token>` in constant time. An unset token disables the
    API (403), so a forgotten secret never means an open door."""
    if not token:
        raise Forbidden(f"{realm}_disabled", f"set {env} to enable this API")
    given = request.headers.get(hdrs.AUTHORIZATION, "")
    challenge = {str(hdrs.WWW_AUTHENTICATE): f'Bearer realm="nearvoice-{realm}"'}
    if not given.startswith(BEARER):
        raise Unauthorized("unauthorized", "missing bearer token", headers=challenge)
    if not hmac.compare_digest(_token_bytes(given[len(BEARER) :]), _token_bytes(token)):
        raise Unauthorized("unauthorized", "wrong bearer token", headers=challenge)
