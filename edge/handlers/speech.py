"""`GET|HEAD /v1/speech/{key}.{ext}`: the player-facing path.

authorize (nothing touches the cache before this passes) -> hot tier or disk hit ->
deliver; on a miss, render locally, store, deliver.
"""

from __future__ import annotations

import time

from aiohttp import web

from edge.errors import BadRequest, RequestError
from edge.handlers.keys import NODE
from edge.http.deliver import deliver
from edge.metrics import Result, Source
from edge.node import Node
from edge.token import Grant


def _authorize(node: Node, request: web.Request) -> Grant:
    def query() -> tuple[dict[str, str], bool]:
        parsed = request.rel_url.query
        flat = {name: parsed[name] for name in parsed}
        return flat, len(flat) != len(parsed)

    info = request.match_info
    return node.authorize(request.raw_path, info["key"], info["ext"], query, request.remote)


async def speech(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    node = request.app[NODE]
    metrics = node.metrics
    try:
        grant = _authorize(node, request)
    except RequestError:
        metrics.requests_by[Result.REJECTED].inc()
        raise

    options = node.delivery
    held = await node.lookup(grant.spec.key) if grant.policy.stored else None
    if held is not None:
        result, source = Result.HIT, Source.CACHE
        try:
            with held as file:
                delivered = await deliver(
                    request,
                    held.meta,
                    grant.policy,
                    body=held.body,
                    file=file,
                    options=options,
                )
        except RequestError:  # 412 and 416 about a cached object still count as hits
            metrics.requests_by[result].inc()
            raise
    else:
        result = Result.MISS if grant.policy.stored else Result.BYPASS
        source = Source.SYNTH
        try:
            rendered = await node.render(grant)
        except RequestError:
            metrics.requests_by[Result.ERROR].inc()
            raise
        meta = await node.store_rendered(grant, rendered)
        try:
            delivered = await deliver(
                request, meta, grant.policy, body=rendered.body, file=None, options=options
            )
        except RequestError:
            metrics.requests_by[result].inc()
            raise
    metrics.requests_by[result].inc()
    metrics.bytes_by[source].inc(delivered.body_bytes)
    metrics.ttfb_by[result].observe(time.perf_counter() - started)
    return delivered.response


async def malformed(request: web.Request) -> web.StreamResponse:
    """Anything under /v1/speech/ that is not `{64 hex}.{ext}`: traversal attempts included."""
    request.app[NODE].metrics.requests_by[Result.REJECTED].inc()
    raise BadRequest("malformed_key", "expected /v1/speech/{64 hex key}.{format}")
