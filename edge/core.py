"""The one request core every door shares: from a grant (a spec under a policy) to a
delivered object.

Phases, in order (docs/architecture.md#the-parts: doors over one core):

1. lookup: an object being produced is joined before the disk is looked at (followers of
   a render must not queue behind an executor hop); otherwise the hot tier, then disk.
   Drafts are never looked up.
2. admit: the door's limiter, told whether this request would start a fill (`miss`) or
   not (`hit`: a cached object, or a fill already under way). A request over its miss
   budget is refused here, before any fill, render or upstream fetch starts.
3. fill: join or start the object's single-flight fill (edge.node.Node.obtain), which
   renders locally or fetches from upstream (edge.producer).
4. deliver: the door's own framing. The signed-URL door answers with Range semantics
   (edge.http.deliver, edge.http.stream); the OpenAI-compatible door with a raw body or
   server-sent events (edge.handlers.openai).
5. log: the result, the source and the time to first byte, counted once per request.

A fill that fails before the door sent a byte is answered with an expired copy still on
disk (stale-if-error, RFC 5861 section 4) when there is one, otherwise with the JSON error
that `fill_error` maps it to. An upstream's definitive 404 or 410 about the object
(edge.upstream.RELAYED) is not an error in RFC 5861's sense (only 500, 502, 503 and 504
are): it is relayed with its status and code, and never masked by a stale copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

from nearvoice.edge.cache.fill import Fill, FillFailed, FillState
from nearvoice.edge.cache.hot import SharedFile
from nearvoice.edge.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    Gone,
    NotFound,
    RequestError,
    ServiceUnavailable,
)
from nearvoice.edge.http.deliver import Delivered
from nearvoice.edge.limits import Scope
from nearvoice.edge.metrics import Result, Source
from nearvoice.edge.node import Held, Node
from nearvoice.edge.token import Grant


class Door(Protocol):
    """How one door frames what the core found. Each call answers the request (or raises
    a RequestError before sending anything); `result` is what the core found, for doors
    that report it in a header."""

    async def send_object(
        self, held: Held, file: SharedFile | None, result: Result, age: int | None
    ) -> Delivered:
        """Sends a complete object, its descriptor (if any) pinned as `file`. `age` is set
        for a stale object served because its fresh copy could not be had."""
        ...

    async def send_fill(self, fill: Fill, result: Result) -> Delivered:
        """Sends an object still being produced. Raises FillFailed when the fill fails
        before anything was sent."""
        ...


Admit = Callable[[Scope], None]
"""A door's limiter: raises a RequestError (429) when the request is over its budget."""


@dataclass(frozen=True, slots=True)
class Served:
    delivered: Delivered
    result: Result
    source: Source


async def serve(
    node: Node,
    grant: Grant,
    target: str,
    door: Door,
    *,
    started: float,
    admit: Admit | None = None,
) -> Served:
    """Answers one request for `grant`'s object through `door`. `target` is a signed
    request target for the object (path and query): what an upstream is asked for on a
    miss. `started` is the request's perf_counter() start, for the TTFB histogram."""
    metrics = node.metrics
    held = None
    if grant.policy.stored and node.running_fill(grant) is None:
        held = await node.lookup(grant.spec.key)
    if held is not None and not held.stale:
        result, source = Result.HIT, Source.CACHE
        _admit(node, admit, Scope.HIT)
        try:
            with held as file:
                delivered = await door.send_object(held, file, result, None)
        except RequestError:  # 412 and 416 about a cached object still count as hits
            metrics.requests_by[result].inc()
            raise
    else:
        try:
            # Joining a fill under way starts nothing: it spends the hit budget.
            _admit(node, admit, Scope.HIT if node.joinable(grant) else Scope.MISS)
            delivered, result, source = await _from_fill(node, grant, target, door, held)
        finally:
            if held is not None:
                held.close()
    metrics.requests_by[result].inc()
    metrics.bytes_by[source].inc(delivered.body_bytes)
    first_byte = delivered.first_byte or time.perf_counter()
    metrics.ttfb_by[result].observe(first_byte - started)
    return Served(delivered, result, source)


def _admit(node: Node, admit: Admit | None, scope: Scope) -> None:
    if admit is None:
        return
    try:
        admit(scope)
    except RequestError:
        node.metrics.requests_by[Result.REJECTED].inc()
        raise


async def _from_fill(
    node: Node, grant: Grant, target: str, door: Door, stale: Held | None
) -> tuple[Delivered, Result, Source]:
    """A miss: join or start the object's fill. When it fails before this request got a
    byte, an expired copy still on disk is served instead (stale-if-error); drafts never
    reach here with one, since they are never looked up."""
    metrics = node.metrics
    fill, joined = node.obtain(grant, target)
    if joined and not fill.is_running():
        result = Result.HIT  # complete and in memory: committed moments ago
    elif joined:
        result = Result.COLLAPSED
    else:
        result = Result.MISS if grant.policy.stored else Result.BYPASS
    try:
        delivered = await door.send_fill(fill, result)
    except FillFailed as exc:
        looked_up = stale is None
        if exc.status is not None:
            # The object is gone upstream: say so, serve nothing (a stale copy passed in
            # is closed by the caller).
            stale = None
        elif stale is None and grant.policy.stored:
            # Requests that joined a running fill skipped the disk: look now, so they get
            # the stale copy too, not just the request that started the fill.
            stale = await node.lookup(grant.spec.key, hit=False)
            if stale is not None and not stale.stale:  # committed by someone meanwhile
                stale.close()
                stale = None
        if stale is None:
            error = fill_error(exc)
            # `error` counts 5xx answers only (what the error-ratio alert pages on); a
            # spec refused as a whole (400) or gone upstream (a relayed 404/410) is a 4xx.
            failed = error.status >= HTTPStatus.INTERNAL_SERVER_ERROR
            metrics.requests_by[Result.ERROR if failed else Result.REJECTED].inc()
            raise error from exc
        age = max(0, int(time.time() - stale.meta.stored_at))
        try:
            with stale as file:
                delivered = await door.send_object(stale, file, Result.STALE, age)
        finally:
            if looked_up:
                stale.close()
        return delivered, Result.STALE, Source.CACHE
    except RequestError:
        metrics.requests_by[result].inc()
        raise
    finally:
        fill.readers -= 1
    source = Source.UPSTREAM if fill.from_upstream else Source.SYNTH
    if fill.state is FillState.FAILED:
        # The headers had gone out when the fill failed (an upstream body cut short, an
        # engine failing mid-render): the client got a broken transfer, not its object.
        return delivered, Result.ERROR, source
    return delivered, result, source


def fill_error(exc: FillFailed) -> RequestError:
    """The JSON answer for a fill that failed before this request sent a byte: an
    upstream's relayed answer with its own status, others by their code."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    if exc.status is not None:
        cls = _RELAYED_ERRORS.get(exc.status, BadGateway)
    else:
        cls = _FILL_ERRORS.get(exc.code, ServiceUnavailable)
    return cls(exc.code, str(exc), headers=headers)


_RELAYED_ERRORS: dict[int, type[RequestError]] = {404: NotFound, 410: Gone}


_FILL_ERRORS: dict[str, type[RequestError]] = {
    "duration_out_of_range": BadRequest,  # a spec no tier renders as asked
    "unsupported_control": BadRequest,
    "unknown_ref": Gone,  # the reference voice was deleted: its specs are refused
    "upstream_timeout": GatewayTimeout,
    "upstream_unavailable": BadGateway,
    "upstream_refused": BadGateway,
    "upstream_truncated": BadGateway,
    "upstream_corrupt": BadGateway,
}
