"""Small request helpers shared by the admin and minting APIs."""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import hdrs, web

from edge.errors import BadRequest, Forbidden, Unauthorized

BEARER = "Bearer "


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or 400 `bad_json`."""
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest("bad_json", "body is not JSON") from exc


def require_bearer(request: web.Request, token: str | None, *, env: str, realm: str) -> None:
    """Checks `Authorization: Bearer <token>` in constant time. An unset token disables the
    API (403), so a forgotten secret never means an open door."""
    if not token:
        raise Forbidden(f"{realm}_disabled", f"set {env} to enable this API")
    given = request.headers.get(hdrs.AUTHORIZATION, "")
    challenge = {str(hdrs.WWW_AUTHENTICATE): f'Bearer realm="nearvoice-{realm}"'}
    if not given.startswith(BEARER):
        raise Unauthorized("unauthorized", "missing bearer token", headers=challenge)
    if not hmac.compare_digest(given[len(BEARER) :].encode(), token.encode()):
        raise Unauthorized("unauthorized", "wrong bearer token", headers=challenge)
