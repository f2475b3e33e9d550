"""The private app a worker answers its siblings with, on its unix socket (edge.workers).

It is never served on the public port, and every request must carry a valid node
signature (edge.nodeauth) over its method and target.

* `GET /v1/speech/{key}.{ext}`: a sibling relaying a miss. This worker owns the key, so it
  joins or starts the object's fill here and answers as it would a player (the in-flight
  stream, or the stored object), with `X-Nearvoice-Source` saying where the bytes came
  from. Internal: not counted as a player request (edge.workers explains the metrics).
* `POST /worker/purge?sha256=<digest of the body>` `{"keys": [...]}`: forget the keys
  (`Node.forget`); the sibling that purged has already removed them from the disk store.
* `GET /worker/hotkeys`: every hot-key counter of this worker, for the node-wide report.
* `GET /worker/stats`: this process's own figures (hot tier).
* `GET /worker/prefetch/{job}`: the progress of a prefetch job this worker runs, or 404.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from typing import Any

from aiohttp import web

from nearvoice.edge.cache.fill import Fill, FillFailed
from nearvoice.edge.core import fill_error
from nearvoice.edge.errors import BadRequest, Forbidden, NotFound
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.deliver import deliver
from nearvoice.edge.http.middleware import errors_as_json
from nearvoice.edge.http.stream import deliver_fill
from nearvoice.edge.metrics import Source
from nearvoice.edge.node import Node
from nearvoice.edge.nodeauth import NODE_HEADER, destination
from nearvoice.edge.spec import KEY_RE
from nearvoice.edge.workers import (
    HOTKEYS_PATH,
    PREFETCH_PATH,
    PURGE_PATH,
    SOURCE_HEADER,
    STATS_PATH,
    Outcome,
)

_FILL = web.RequestKey("fill", Fill)


def channel_app(node_app: web.Application, speech_route: str) -> web.Application:
    """The channel app of the node in `node_app`, answering speech at `speech_route`."""
    node = node_app[NODE]
    app = web.Application(
        middlewares=[errors_as_json, _node_signed],
        handler_args={"max_line_size": node.config.http.max_line_size},
    )
    app[NODE] = node
    app.router.add_get(speech_route, speech)
    app.router.add_post(PURGE_PATH, purge)
    app.router.add_get(HOTKEYS_PATH, hotkeys)
    app.router.add_get(STATS_PATH, stats)
    app.router.add_get(PREFETCH_PATH + "/{job}", prefetch_progress)
    app.on_response_prepare.append(_name_source)
    return app


@web.middleware
async def _node_signed(request: web.Request, handler: Any) -> web.StreamResponse:
    node = request.app[NODE]
    signature = request.headers.get(NODE_HEADER)
    # Siblings sign for this worker's channel name (edge.workers._SiblingClient).
    here = (destination(f"http://worker-{node.siblings.index}"),)
    if signature is None or not node.node_auth.verify(
        signature, request.method, request.raw_path, local=here
    ):
        raise Forbidden("bad_node_signature", "worker channel requests must be node-signed")
    response: web.StreamResponse = await handler(request)
    return response


async def speech(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    info = request.match_info

    def query() -> tuple[dict[str, str], bool]:
        parsed = request.rel_url.query
        flat = {name: parsed[name] for name in parsed}
        return flat, len(flat) != len(parsed)

    grant = node.authorize(request.raw_path, info["key"], info["ext"], query, None, trusted=True)
    # Streamed through aiohttp's own responses, so that `_name_source` sees each one.
    options = replace(node.delivery, direct=False)
    node.siblings.outcomes[Outcome.SERVED].inc()
    held = None
    if grant.policy.stored and node.running_fill(grant) is None:
        held = await node.lookup(grant.spec.key, hit=False)
    if held is not None and not held.stale:
        with held as file:
            delivered = await deliver(
                request, held.meta, grant.policy, body=held.body, file=file, options=options
            )
        return delivered.response
    if held is not None:
        held.close()  # expired: the sibling serves its own stale copy if the fill fails
    fill, _ = node.obtain(grant, request.raw_path)
    request[_FILL] = fill
    try:
        delivered = await deliver_fill(request, fill, grant.policy, options)
    except FillFailed as exc:
        raise fill_error(exc) from exc
    finally:
        fill.readers -= 1
    return delivered.response


async def _name_source(request: web.Request, response: web.StreamResponse) -> None:
    fill = request.get(_FILL)
    if fill is None:
        source = Source.CACHE
    else:
        source = Source.UPSTREAM if fill.from_upstream else Source.SYNTH
    response.headers[SOURCE_HEADER] = source.value


async def purge(request: web.Request) -> web.Response:
    body = await request.read()
    if request.query.get("sha256") != hashlib.sha256(body).hexdigest():
        raise BadRequest("digest_mismatch", "the body is not the one the target names")
    try:
        keys = json.loads(body)["keys"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadRequest("bad_keys", "expected {'keys': [...]}") from exc
    if not isinstance(keys, list) or not all(
        isinstance(k, str) and KEY_RE.fullmatch(k) for k in keys
    ):
        raise BadRequest("bad_keys", "keys must be 64 lowercase hex characters")
    node = request.app[NODE]
    for key in keys:
        for fill in node.forget(key):
            await fill.settled()  # (edge.node.Node._purge)
    return web.json_response({"forgot": len(keys)})


async def hotkeys(request: web.Request) -> web.Response:
    counter = request.app[NODE].hotkeys
    every = counter.top(max(1, len(counter)))
    return web.json_response(
        {
            "capacity": counter.capacity,
            "keys": [[h.key, h.hits, h.error] for h in every],
        }
    )


async def stats(request: web.Request) -> web.Response:
    return web.json_response(process_stats(request.app[NODE]))


async def prefetch_progress(request: web.Request) -> web.Response:
    job = request.app[NODE].prefetcher.jobs.get(request.match_info["job"])
    if job is None:
        raise NotFound("unknown_job", "no such prefetch job here")
    return web.json_response(job.report())


def process_stats(node: Node) -> dict[str, Any]:
    """The figures one worker holds in its own memory."""
    return {
        "worker": node.siblings.index,
        "pid": os.getpid(),
        "hot": {"objects": len(node.hot), "memory_bytes": node.hot.memory},
    }
