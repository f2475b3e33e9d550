"""Admin API, behind `Authorization: Bearer $NEARVOICE_ADMIN_TOKEN`.

* `POST /admin/purge` `{"keys": [...]}`: removes objects from every tier of this node.
* `GET /admin/stats`: cache occupancy and hot-tier state.
* `GET /admin/hotkeys?k=N`: the N most requested keys, from a bounded Space-Saving counter.
* `POST /admin/prefetch` `{"urls": [...], "specs": [...]}`: warms objects in the background;
  answers 202 with a job id. `GET /admin/prefetch/{id}`: the job's progress.

A purge with `"cascade": true` is repeated at each key's home upstream (a shield, which
cascades on to its origin), so a purged object is gone from every tier that could refill it.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import hdrs, web

from edge.config import ADMIN_TOKEN_ENV
from edge.errors import BadRequest, NotFound
from edge.handlers.keys import NODE
from edge.http.requests import BEARER, read_json, require_bearer
from edge.spec import KEY_RE
from edge.upstream import rendezvous_order

MAX_PURGE_KEYS = 1000
CASCADE_TIMEOUT = 5.0  # seconds for the purge at the upstream
MAX_TOP_K = 1000
DEFAULT_TOP_K = 20


def require_admin(request: web.Request) -> None:
    token = request.app[NODE].config.admin_token
    require_bearer(request, token, env=ADMIN_TOKEN_ENV, realm="admin")


async def purge(request: web.Request) -> web.Response:
    require_admin(request)
    payload = await read_json(request)
    keys = payload.get("keys") if isinstance(payload, dict) else None
    if not isinstance(keys, list) or not keys or len(keys) > MAX_PURGE_KEYS:
        raise BadRequest("bad_keys", f"expected {{'keys': [1..{MAX_PURGE_KEYS} keys]}}")
    bad = [k for k in keys if not isinstance(k, str) or not KEY_RE.fullmatch(k)]
    if bad:
        raise BadRequest("malformed_key", "keys must be 64 lowercase hex characters")
    cascade = payload.get("cascade", False)
    if not isinstance(cascade, bool):
        raise BadRequest("bad_cascade", "cascade must be true or false")
    node = request.app[NODE]
    purged: list[str] = []
    missing: list[str] = []
    for key in dict.fromkeys(keys):
        (purged if await node.purge(key) else missing).append(key)
    answer: dict[str, Any] = {"purged": purged, "missing": missing}
    if cascade and node.upstreams.available:
        answer["cascade"] = await _cascade(request, list(dict.fromkeys(keys)))
    return web.json_response(answer)


async def _cascade(request: web.Request, keys: list[str]) -> dict[str, Any]:
    """Repeats the purge at each key's home upstream, with this node's admin token."""
    node = request.app[NODE]
    homes: dict[str, list[str]] = {}
    for key in keys:
        homes.setdefault(rendezvous_order(key, node.upstreams.bases)[0], []).append(key)
    token = node.config.admin_token or ""
    results: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=CASCADE_TIMEOUT)
    tls = node.upstreams.client_tls
    connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for base, home_keys in homes.items():
            try:
                async with session.post(
                    f"{base}/admin/purge",
                    json={"keys": home_keys, "cascade": True},
                    headers={hdrs.AUTHORIZATION: f"{BEARER}{token}"},
                ) as response:
                    results[base] = {"status": response.status, "keys": len(home_keys)}
            except (aiohttp.ClientError, TimeoutError) as exc:
                results[base] = {"error": type(exc).__name__, "keys": len(home_keys)}
    return results


async def prefetch(request: web.Request) -> web.Response:
    require_admin(request)
    payload = await read_json(request)
    prefetcher = request.app[NODE].prefetcher
    job = prefetcher.start(prefetcher.items(payload))
    return web.json_response(
        {**job.report(), "progress": f"/admin/prefetch/{job.id}"}, status=HTTPStatus.ACCEPTED
    )


async def prefetch_progress(request: web.Request) -> web.Response:
    require_admin(request)
    job = request.app[NODE].prefetcher.jobs.get(request.match_info["job"])
    if job is None:
        raise NotFound("unknown_job", "no such prefetch job (finished jobs are kept a while)")
    return web.json_response(job.report())


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
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_TOP_K:
        raise BadRequest("bad_k", f"k must be an integer in 1..{MAX_TOP_K}")
    top = request.app[NODE].hotkeys.top(int(raw))
    return web.json_response(
        {"keys": [{"key": h.key, "hits": h.hits, "error": h.error} for h in top]},
        status=HTTPStatus.OK,
    )
