"""Admin API, behind `Authorization: Bearer $NEARVOICE_ADMIN_TOKEN`.

* `POST /admin/purge` `{"keys": [...]}`: removes objects from every tier of this node.
* `GET /admin/stats`: cache occupancy and hot-tier state.
* `GET /admin/hotkeys?k=N`: the N most requested keys, from a bounded Space-Saving counter.
"""

from __future__ import annotations

import hmac
import json
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web

from edge.errors import BadRequest, Forbidden, Unauthorized
from edge.handlers.keys import NODE
from edge.spec import KEY_RE

MAX_PURGE_KEYS = 1000
MAX_TOP_K = 1000
DEFAULT_TOP_K = 20
_BEARER = "Bearer "


def require_admin(request: web.Request) -> None:
    token = request.app[NODE].config.admin_token
    if token is None:
        raise Forbidden("admin_disabled", "set NEARVOICE_ADMIN_TOKEN to enable the admin API")
    given = request.headers.get(hdrs.AUTHORIZATION, "")
    challenge = {str(hdrs.WWW_AUTHENTICATE): 'Bearer realm="nearvoice-admin"'}
    if not given.startswith(_BEARER):
        raise Unauthorized("unauthorized", "missing bearer token", headers=challenge)
    if not hmac.compare_digest(given[len(_BEARER) :].encode(), token.encode()):
        raise Unauthorized("unauthorized", "wrong bearer token", headers=challenge)


async def purge(request: web.Request) -> web.Response:
    require_admin(request)
    try:
        payload: Any = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest("bad_json", "body is not JSON") from exc
    keys = payload.get("keys") if isinstance(payload, dict) else None
    if not isinstance(keys, list) or not keys or len(keys) > MAX_PURGE_KEYS:
        raise BadRequest("bad_keys", f"expected {{'keys': [1..{MAX_PURGE_KEYS} keys]}}")
    bad = [k for k in keys if not isinstance(k, str) or not KEY_RE.fullmatch(k)]
    if bad:
        raise BadRequest("malformed_key", "keys must be 64 lowercase hex characters")
    node = request.app[NODE]
    purged: list[str] = []
    missing: list[str] = []
    for key in dict.fromkeys(keys):
        (purged if await node.purge(key) else missing).append(key)
    return web.json_response({"purged": purged, "missing": missing})


async def stats(request: web.Request) -> web.Response:
    require_admin(request)
    node = request.app[NODE]
    volume, count = await node.refresh_gauges()
    m = node.metrics
    evictions = sum(value for _, value in _samples(m.evictions, "nearvoice_evictions_total"))
    return web.json_response(
        {
            "role": node.config.role.value,
            "disk": {
                "bytes": volume,
                "objects": count,
                "size_limit": node.config.store.size_limit,
                "evictions": int(evictions),
            },
            "hot": {"objects": len(node.hot), "memory_bytes": node.hot.memory},
            "requests": {
                labels[0]: int(value)
                for labels, value in _samples(m.requests, "nearvoice_requests_total")
            },
        }
    )


def _samples(metric: Any, name: str) -> list[tuple[tuple[str, ...], float]]:
    out = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name:
                out.append((tuple(sample.labels.values()), sample.value))
    return out


async def hotkeys(request: web.Request) -> web.Response:
    require_admin(request)
    raw = request.query.get("k", str(DEFAULT_TOP_K))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TOP_K:
        raise BadRequest("bad_k", f"k must be an integer in 1..{MAX_TOP_K}")
    top = request.app[NODE].hotkeys.top(int(raw))
    return web.json_response(
        {"keys": [{"key": h.key, "hits": h.hits, "error": h.error} for h in top]},
        status=HTTPStatus.OK,
    )
