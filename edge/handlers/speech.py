"""`GET|HEAD /v1/speech/{key}.{ext}`: the player-facing door.

authorize (nothing touches the cache before this passes), then the shared core
(edge.core: lookup -> fill -> deliver), framed with Range semantics: complete objects
through edge.http.deliver, objects still being produced through edge.http.stream.
"""

from __future__ import annotations

import time

from aiohttp import web

from edge.cache.fill import Fill
from edge.cache.hot import SharedFile
from edge.core import serve
from edge.errors import BadRequest, RequestError
from edge.handlers.keys import NODE
from edge.http.deliver import Delivered, deliver
from edge.http.proxies import client_address
from edge.http.stream import deliver_fill
from edge.metrics import Result
from edge.node import Held, Node
from edge.nodeauth import NODE_HEADER, local_names
from edge.token import Grant


def _authorize(node: Node, request: web.Request) -> Grant:
    def query() -> tuple[dict[str, str], bool]:
        parsed = request.rel_url.query
        flat = {name: parsed[name] for name in parsed}
        return flat, len(flat) != len(parsed)

    info = request.match_info
    signature = request.headers.get(NODE_HEADER)
    transport = request.transport
    local: tuple[str, ...] = ()
    if signature is not None and transport is not None:
        scheme = "https" if request.secure else "http"
        local = local_names(scheme, transport.get_extra_info("sockname"))
    return node.authorize(
        request.raw_path,
        info["key"],
        info["ext"],
        query,
        client_address(request),
        signature,
        method=request.method,
        local=local,
    )


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
    try:
        grant = _authorize(node, request)
    except RequestError:
        node.metrics.requests_by[Result.REJECTED].inc()
        raise
    door = RangeDoor(request, node, grant)
    served = await serve(node, grant, request.raw_path, door, started=started)
    return served.delivered.response


async def malformed(request: web.Request) -> web.StreamResponse:
    """Anything under /v1/speech/ that is not `{64 hex}.{ext}`: traversal attempts included."""
    request.app[NODE].metrics.requests_by[Result.REJECTED].inc()
    raise BadRequest("malformed_key", "expected /v1/speech/{64 hex key}.{format}")
