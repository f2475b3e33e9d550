"""`GET|HEAD /v1/speech/{key}.{ext}`: the player-facing door.

authorize (nothing touches the cache before this passes), then the shared core
(edge.core: lookup -> fill -> deliver), framed with Range semantics: complete objects
through edge.http.deliver, objects still being produced through edge.http.stream.
"""

from __future__ import annotations

import time

from aiohttp import web

from nearvoice.edge.cache.fill import Fill
from nearvoice.edge.cache.hot import SharedFile
from nearvoice.edge.core import serve
from nearvoice.edge.errors import BadRequest, RequestError
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.deliver import Delivered, deliver
from nearvoice.edge.http.protocol import mark_node_peer
from nearvoice.edge.http.proxies import client_address
from nearvoice.edge.http.stream import deliver_fill
from nearvoice.edge.limits import Limiter, Rates, Scope
from nearvoice.edge.metrics import Result
from nearvoice.edge.node import Held, Node
from nearvoice.edge.nodeauth import NODE_HEADER, local_names
from nearvoice.edge.policy import Policy
from nearvoice.edge.token import Grant


def _authorize(node: Node, request: web.Request, client: str | None) -> tuple[Grant, bool]:
    """The URL's grant, and whether a node of a tier below signed the request (then it
    vouches for the client address, edge.nodeauth)."""

    def query() -> tuple[dict[str, str], bool]:
        parsed = request.rel_url.query
        flat = {name: parsed[name] for name in parsed}
        return flat, len(flat) != len(parsed)

    info = request.match_info
    signature = request.headers.get(NODE_HEADER)
    via_node = False
    transport = request.transport
    if signature is not None and transport is not None:
        scheme = "https" if request.secure else "http"
        local = local_names(scheme, transport.get_extra_info("sockname"))
        via_node = node.node_auth.verify(signature, request.method, request.raw_path, local=local)
        if via_node:
            mark_node_peer(request)
    grant = node.authorize(
        request.raw_path,
        info["key"],
        info["ext"],
        query,
        client,
        trusted=via_node,
        method=request.method,
    )
    return grant, via_node


BucketKey = tuple[str, str | None]
"""("ip", client address) or ("kid", key id)."""


class UrlAdmission:
    """Signed URLs' limiter (docs/contracts.md#rate-limits): a bucket per client address and one
    per signing key id, hit and miss budgets apart; requests signed by a node of a tier
    below are not limited per address (one edge carries many players). Called with a
    scope, it takes a token from each bucket or raises RateLimited (edge.core.Admit)."""

    __slots__ = ("keys", "limiter", "rates")

    def __init__(self, limiter: Limiter, rates: Rates, keys: tuple[BucketKey, ...]) -> None:
        self.limiter = limiter
        self.rates = rates
        self.keys = keys

    def __call__(self, scope: Scope) -> None:
        for key in self.keys:
            self.limiter.take(key, scope, self.rates, scope.value, key[0])

    def allows(self, scope: Scope) -> bool:
        """Whether a request of `scope` would be admitted; takes and counts nothing."""
        return all(self.limiter.allows(key, scope, self.rates) for key in self.keys)


def admission(
    node: Node, client: str | None, kid: str, policy: Policy, via_node: bool
) -> UrlAdmission | None:
    """The request's admission, or None when no limit is configured for its policy."""
    limits = node.config.limits
    if not limits.enabled:
        return None
    rates = limits.rates(policy.value)
    if not (rates.hit_rate or rates.miss_rate):
        return None
    keys: tuple[BucketKey, ...] = (("kid", kid),) if via_node else (("ip", client), ("kid", kid))
    return UrlAdmission(node.limiter, rates, keys)


class RangeDoor:
    """Signed URLs' framing: HTTP Range, preconditions and HEAD, as a file server's."""

    def __init__(self, request: web.Request, node: Node, grant: Grant) -> None:
        self.request = request
        self.node = node
        self.grant = grant

    async def send_object(
        self, held: Held, file: SharedFile | None, result: Result, age: int | None
    ) -> Delivered:
        return await deliver(
            self.request,
            held.meta,
            self.grant.policy,
            body=held.body,
            file=file,
            options=self.node.delivery,
            age=age,
        )

    async def send_fill(self, fill: Fill, result: Result) -> Delivered:
        return await deliver_fill(self.request, fill, self.grant.policy, self.node.delivery)


async def speech(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    node = request.app[NODE]
    client = client_address(request)
    try:
        grant, via_node = _authorize(node, request, client)
    except RequestError:
        node.metrics.requests_by[Result.REJECTED].inc()
        raise
    admit = admission(node, client, request.rel_url.query.get("kid", ""), grant.policy, via_node)
    door = RangeDoor(request, node, grant)
    served = await serve(node, grant, request.raw_path, door, started=started, admit=admit)
    return served.delivered.response


async def malformed(request: web.Request) -> web.StreamResponse:
    """Anything under /v1/speech/ that is not `{64 hex}.{ext}`: traversal attempts included."""
    request.app[NODE].metrics.requests_by[Result.REJECTED].inc()
    raise BadRequest("malformed_key", "expected /v1/speech/{64 hex key}.{format}")
