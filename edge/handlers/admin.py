"""Admin API, behind `Authorization: Bearer $NEARVOICE_ADMIN_TOKEN`.

* `POST /admin/purge` `{"keys": [...]}`: removes objects from every tier of this node, in
  every worker (each sibling acknowledges before the answer; edge.workers).
* `GET /admin/stats`: cache occupancy, hot-tier state and request counts, for the whole
  node: with `--workers N`, the workers' hot tiers are added up (and listed under
  `workers`), and counters are read from every worker's metrics.
* `GET /admin/hotkeys?k=N`: the N most requested keys, from bounded Space-Saving counters,
  merged over the node's workers.
* `POST /admin/prefetch` `{"urls": [...], "specs": [...]}`: warms objects in the background;
  answers 202 with a job id. `GET /admin/prefetch/{id}`: the job's progress, asked of the
  worker running it when that is another one; `DELETE /admin/prefetch/{id}`: cancels it (no
  further item starts).

A purge with `"cascade": true` is repeated at each key's home upstream (a shield, which
cascades on to its origin), so a purged object is gone from every tier that could refill it.
"""

from __future__ import annotations

import heapq
import os
import re
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from nearvoice.edge.cache.hotkeys import HotKey
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.errors import BadRequest, NotFound
from nearvoice.edge.handlers.channel import process_stats
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.requests import BEARER, read_json, require_bearer
from nearvoice.edge.metrics import MULTIPROC_ENV
from nearvoice.edge.spec import KEY_RE
from nearvoice.edge.upstream import rendezvous_order
from nearvoice.edge.workers import HOTKEYS_PATH, PREFETCH_PATH, STATS_PATH

MAX_PURGE_KEYS = 1000
JOB_RE = re.compile(r"[0-9a-f]{16}")  # prefetch job ids (edge.prefetch)
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
    if node.siblings.enabled:
        told = await node.siblings.purge(list(dict.fromkeys(keys)))
        answer["workers"] = {"acknowledged": sorted(told.answers), "unreachable": told.unreachable}
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
    node = request.app[NODE]
    name = request.match_info["job"]
    job = node.prefetcher.jobs.get(name)
    if job is not None:
        return web.json_response(job.report())
    if node.siblings.enabled and JOB_RE.fullmatch(name):
        # Started through a connection that another worker accepted: that worker runs it.
        found = await node.siblings.gather(f"{PREFETCH_PATH}/{name}")
        for report in found.answers.values():
            return web.json_response(report)
    raise NotFound("unknown_job", "no such prefetch job (finished jobs are kept a while)")


async def prefetch_cancel(request: web.Request) -> web.Response:
    require_admin(request)
    job = request.app[NODE].prefetcher.cancel(request.match_info["job"])
    if job is None:
        raise NotFound("unknown_job", "no such prefetch job (finished jobs are kept a while)")
    return web.json_response(job.report())


async def stats(request: web.Request) -> web.Response:
    require_admin(request)
    node = request.app[NODE]
    volume, count = await node.refresh_gauges()
    m = node.metrics
    # With several workers, every worker's counters, as /metrics adds them up.
    shared = _every_worker() if node.siblings.enabled else None
    evictions = sum(
        value for _, value in _samples(shared or m.evictions, "nearvoice_evictions_total")
    )
    requests = _samples(shared or m.requests, "nearvoice_requests_total")
    workers = [process_stats(node)]
    if node.siblings.enabled:
        workers += (await node.siblings.gather(STATS_PATH)).answers.values()
    return web.json_response(
        {
            "role": node.config.role.value,
            "disk": {
                "bytes": volume,
                "objects": count,
                "size_limit": node.config.store.size_limit,
                "evictions": int(evictions),
            },
            "hot": {
                "objects": sum(w["hot"]["objects"] for w in workers),
                "memory_bytes": sum(w["hot"]["memory_bytes"] for w in workers),
            },
            "requests": {labels["result"]: int(value) for labels, value in requests},
            "worker": node.siblings.index,
            "workers": sorted(workers, key=lambda w: int(w["worker"])),
        }
    )


def _every_worker() -> CollectorRegistry | None:
    """A registry reading every worker's metric files (prometheus_client multiprocess)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def _samples(metric: Any, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), sample.value))
    return out


async def hotkeys(request: web.Request) -> web.Response:
    require_admin(request)
    raw = request.query.get("k", str(DEFAULT_TOP_K))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_TOP_K:
        raise BadRequest("bad_k", f"k must be an integer in 1..{MAX_TOP_K}")
    node = request.app[NODE]
    k = int(raw)
    if node.siblings.enabled:
        gathered = await node.siblings.gather(HOTKEYS_PATH)
        counter = node.hotkeys
        mine = [[h.key, h.hits, h.error] for h in counter.top(max(1, len(counter)))]
        summaries = [{"capacity": counter.capacity, "keys": mine}, *gathered.answers.values()]
        top = merge_hotkeys(summaries, k)
    else:
        top = node.hotkeys.top(k)
    return web.json_response(
        {"keys": [{"key": h.key, "hits": h.hits, "error": h.error} for h in top]},
        status=HTTPStatus.OK,
    )


def merge_hotkeys(summaries: list[dict[str, Any]], k: int) -> list[HotKey]:
    """The top `k` of several workers' Space-Saving summaries, each `{"capacity", "keys":
    [[key, hits, error], ...]}` with every counter it holds.

    Counts add up. A key missing from a full summary may still have been counted there,
    up to that summary's smallest counter, so that much is added to its hits and to its
    error: merged counts over-estimate by at most `error`, as each summary's do (the
    mergeable summaries of Agarwal et al., 2012)."""
    hits: dict[str, int] = {}
    errors: dict[str, int] = {}
    floors: list[tuple[int, set[str]]] = []
    for summary in summaries:
        rows = summary["keys"]
        present = {str(row[0]) for row in rows}
        for key, count, error in rows:
            hits[key] = hits.get(key, 0) + int(count)
            errors[key] = errors.get(key, 0) + int(error)
        full = len(rows) >= int(summary["capacity"])
        floors.append((min(int(row[1]) for row in rows) if full and rows else 0, present))
    for floor, present in floors:
        if floor:
            for key in hits.keys() - present:
                hits[key] += floor
                errors[key] += floor
    best = heapq.nlargest(k, hits.items(), key=lambda item: item[1])
    return [HotKey(key, count, errors[key]) for key, count in best]
