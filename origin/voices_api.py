"""`/v1/voices`: the origin's reference voices API (docs/contracts.md#reference-voices),
behind the mint token like the minting API.

* `POST /v1/voices`: a clip as the raw body with an audio Content-Type (`audio/wav`,
  `audio/mpeg`, ...; `application/octet-stream` too), or as the part named `file` of a
  `multipart/form-data` body (RFC 7578). Answers 201 `{"id", "sha256", "seconds"}`; the
  same clip again gets the same id. A body over 10 MB is cut off at that size and
  answered 413 without reading the rest.
* `GET /v1/voices/{id}`: the same description, or 404 `unknown_ref`.
* `DELETE /v1/voices/{id}`: removes the clip, purges every object rendered from it from
  this origin and, through the edges it pushes to (`[origin] push_edges`, with the admin
  token), from the tiers below; specs that name it are refused from then on.

Decoding and the store's I/O run in the node's I/O pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from urllib.parse import urljoin

import aiohttp
from aiohttp import hdrs, web

from nearvoice.edge.config import ADMIN_TOKEN_ENV, MINT_TOKEN_ENV
from nearvoice.edge.errors import BadRequest, NotFound, PayloadTooLarge, RequestError
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.requests import require_bearer
from nearvoice.origin.refvoices import MAX_BYTES, ClipError, RefVoices

log = logging.getLogger("nearvoice.origin.voices")
REGISTRY: web.AppKey[RefVoices] = web.AppKey("ref_voices", RefVoices)
PURGE_TIMEOUT = 5.0  # seconds for one edge's purge
RAW_TYPES = ("application/octet-stream",)


class UnsupportedMediaType(RequestError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


def _auth(request: web.Request) -> None:
    require_bearer(request, os.environ.get(MINT_TOKEN_ENV), env=MINT_TOKEN_ENV, realm="mint")


async def _read_limited(stream: aiohttp.StreamReader | aiohttp.BodyPartReader) -> bytes:
    data = bytearray()
    while True:
        chunk = (
            await stream.read_chunk(65536)
            if isinstance(stream, aiohttp.BodyPartReader)
            else await stream.read(65536)
        )
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_BYTES:
            raise PayloadTooLarge("clip_too_large", f"the clip is over {MAX_BYTES} bytes")


async def _clip(request: web.Request) -> bytes:
    kind = request.content_type
    if kind == "multipart/form-data":
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, aiohttp.BodyPartReader) and part.name == "file":
                return await _read_limited(part)
        raise BadRequest("missing_file", "the multipart body has no part named 'file'")
    if kind.startswith("audio/") or kind in RAW_TYPES:
        return await _read_limited(request.content)
    raise UnsupportedMediaType(
        "unsupported_media_type", "send the clip with an audio Content-Type or as multipart"
    )


async def add_voice(request: web.Request) -> web.Response:
    _auth(request)
    registry = request.app[REGISTRY]
    data = await _clip(request)
    loop = asyncio.get_running_loop()
    try:
        voice = await loop.run_in_executor(request.app[NODE].io, registry.add, data)
    except ClipError as exc:
        cls = PayloadTooLarge if exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE else BadRequest
        raise cls(exc.code, str(exc)) from exc
    return web.json_response(voice.describe(), status=HTTPStatus.CREATED)


async def get_voice(request: web.Request) -> web.Response:
    _auth(request)
    ref = request.match_info["id"]
    loop = asyncio.get_running_loop()
    voice = await loop.run_in_executor(request.app[NODE].io, request.app[REGISTRY].get, ref)
    if voice is None:
        raise NotFound("unknown_ref", f"no reference voice {ref!r}")
    return web.json_response(voice.describe())


async def delete_voice(request: web.Request) -> web.Response:
    _auth(request)
    node = request.app[NODE]
    ref = request.match_info["id"]
    loop = asyncio.get_running_loop()
    keys = await loop.run_in_executor(node.io, request.app[REGISTRY].delete, ref)
    if keys is None:
        raise NotFound("unknown_ref", f"no reference voice {ref!r}")
    for key in keys:
        await node.purge(key)
    edges = await _purge_edges(node.config.origin.push_edges, keys)
    return web.json_response({"id": ref, "deleted": True, "purged": keys, "edges": edges})


async def _purge_edges(edges: tuple[str, ...], keys: list[str]) -> dict[str, int | str]:
    """Asks each edge to purge `keys` with cascade (it repeats the purge at its shield):
    edge -> status, or the error."""
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not edges or not keys:
        return {}
    if not token:
        log.warning("not purging edges: %s is not set", ADMIN_TOKEN_ENV)
        return {edge: "no admin token" for edge in edges}
    answers: dict[str, int | str] = {}
    timeout = aiohttp.ClientTimeout(total=PURGE_TIMEOUT)
    headers = {hdrs.AUTHORIZATION: f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for edge in edges:
            url = urljoin(edge.rstrip("/") + "/", "admin/purge")
            try:
                async with session.post(
                    url, json={"keys": keys, "cascade": True}, headers=headers
                ) as response:
                    answers[edge] = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("purge at %s failed: %s", edge, exc)
                answers[edge] = type(exc).__name__
    return answers


def setup(app: web.Application, registry: RefVoices) -> None:
    app[REGISTRY] = registry
    app.router.add_post("/v1/voices", add_voice)
    app.router.add_get("/v1/voices/{id}", get_voice)
    app.router.add_delete("/v1/voices/{id}", delete_voice)
