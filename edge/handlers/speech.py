"""`GET|HEAD /v1/speech/{key}.{ext}`: the player-facing path.

authorize (nothing touches the cache before this passes) -> hot tier or disk hit ->
deliver; on a miss, render locally, store, deliver.
"""

from __future__ import annotations

import time

from aiohttp import web

from edge.cache.fill import FillFailed
from edge.errors import BadGateway, BadRequest, GatewayTimeout, RequestError, ServiceUnavailable
from edge.handlers.keys import NODE
from edge.http.deliver import Delivered, deliver
from edge.http.stream import deliver_fill
from edge.metrics import Result, Source
from edge.node import Held, Node
from edge.nodeauth import NODE_HEADER
from edge.token import Grant


def _authorize(node: Node, request: web.Request) -> Grant:
    def query() -> tuple[dict[str, str], bool]:
        parsed = request.rel_url.query
        flat = {name: parsed[name] for name in parsed}
        return flat, len(flat) != len(parsed)

    info = request.match_info
    return node.authorize(
        request.raw_path,
        info["key"],
        info["ext"],
        query,
        request.remote,
        request.headers.get(NODE_HEADER),
        method=request.method,
    )


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
    # An object being produced is joined before looking at the disk: followers of a
    # render must not queue behind an executor hop.
    held = None
    if grant.policy.stored and node.running_fill(grant) is None:
        held = await node.lookup(grant.spec.key)
    if held is not None and not held.stale:
        result, source = Result.HIT, Source.CACHE
        try:
            with held as file:
                delivered = await deliver(
                    request, held.meta, grant.policy, body=held.body, file=file, options=options
                )
        except RequestError:  # 412 and 416 about a cached object still count as hits
            metrics.requests_by[result].inc()
            raise
    else:
        try:
            delivered, result, source = await _from_fill(request, node, grant, held)
        finally:
            if held is not None:
                held.close()
    metrics.requests_by[result].inc()
    metrics.bytes_by[source].inc(delivered.body_bytes)
    first_byte = delivered.first_byte or time.perf_counter()
    metrics.ttfb_by[result].observe(first_byte - started)
    return delivered.response


async def _from_fill(
    request: web.Request, node: Node, grant: Grant, stale: Held | None
) -> tuple[Delivered, Result, Source]:
    """A miss: join or start the object's fill. When it fails before this request got a
    byte, an expired copy still on disk is served instead (stale-if-error); drafts never
    reach here with one, since they are never looked up."""
    metrics = node.metrics
    fill, joined = node.obtain(grant, request.raw_path)
    if joined and not fill.is_running():
        result = Result.HIT  # complete and in memory: committed moments ago
    elif joined:
        result = Result.COLLAPSED
    else:
        result = Result.MISS if grant.policy.stored else Result.BYPASS
    try:
        delivered = await deliver_fill(request, fill, grant.policy, node.delivery)
    except FillFailed as exc:
        looked_up = stale is None
        if stale is None and grant.policy.stored:
            # Requests that joined a running fill skipped the disk: look now, so they get
            # the stale copy too, not just the request that started the fill.
            stale = await node.lookup(grant.spec.key, hit=False)
            if stale is not None and not stale.stale:  # committed by someone meanwhile
                stale.close()
                stale = None
        if stale is None:
            metrics.requests_by[Result.ERROR].inc()
            raise fill_error(exc) from exc
        age = max(0, int(time.time() - stale.meta.stored_at))
        try:
            with stale as file:
                delivered = await deliver(
                    request,
                    stale.meta,
                    grant.policy,
                    body=stale.body,
                    file=file,
                    options=node.delivery,
                    age=age,
                )
        finally:
            if looked_up:
                stale.close()
        return delivered, Result.STALE, Source.CACHE
    except RequestError:
        metrics.requests_by[result].inc()
        raise
    finally:
        fill.readers -= 1
    return delivered, result, Source.UPSTREAM if fill.from_upstream else Source.SYNTH


def fill_error(exc: FillFailed) -> RequestError:
    """The JSON answer for a fill that failed before this request sent a byte."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    cls = _FILL_ERRORS.get(exc.code, ServiceUnavailable)
    return cls(exc.code, str(exc), headers=headers)


_FILL_ERRORS: dict[str, type[RequestError]] = {
    "upstream_timeout": GatewayTimeout,
    "upstream_unavailable": BadGateway,
    "upstream_refused": BadGateway,
    "upstream_truncated": BadGateway,
    "upstream_corrupt": BadGateway,
}


async def malformed(request: web.Request) -> web.StreamResponse:
    """Anything under /v1/speech/ that is not `{64 hex}.{ext}`: traversal attempts included."""
    request.app[NODE].metrics.requests_by[Result.REJECTED].inc()
    raise BadRequest("malformed_key", "expected /v1/speech/{64 hex key}.{format}")
