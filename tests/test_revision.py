"""No ETag ever names two byte sequences (docs/contracts.md#render-revisions).

What the encoders and the chunking write carries a render revision, named in each object's
ETag (edge.cache.meta). Bytes keep the revision they were rendered at from tier to tier: an
edge that relays an object rendered by an older upstream stores and serves it under that
upstream's ETag, never under its own revision's.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.meta import RENDER_REVISION, etag_for, revision_of
from nearvoice.edge.upstream import CHECKSUM_HEADER
from tests.support import make_config, make_keyring, make_spec, payload, sign, value_files

KEYRING = make_keyring()
BODY = payload(30_000, seed=3)


def test_etags_name_key_and_revision() -> None:
    key = "ab" * 32
    assert etag_for(key, 1) == f'"{key}"'  # what revision 1 served: kept as it was
    assert etag_for(key) == f'"{key}.r{RENDER_REVISION}"'
    assert RENDER_REVISION >= 2
    for revision in (1, 2, 17):
        assert revision_of(key, etag_for(key, revision)) == revision
    assert revision_of(key, etag_for("cd" * 32)) is None
    assert revision_of(key, f'"{key}.rx"') is None
    assert revision_of(key, f'W/"{key}"') is None


@asynccontextmanager
async def upstream_sending(etag_of: Any) -> AsyncIterator[str]:
    """A real HTTP upstream on loopback answering every speech path with BODY under the
    ETag `etag_of(key)`."""

    async def handle(request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        headers = {
            "Content-Type": "audio/wav",
            "ETag": etag_of(key),
            CHECKSUM_HEADER: hashlib.sha256(BODY).hexdigest(),
        }
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(BODY))})
        return web.Response(body=BODY, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/v1/speech/{key:[0-9a-f]{64}}.{ext}", handle)
    async with TestServer(app) as server:
        yield str(server.make_url("")).rstrip("/")


@asynccontextmanager
async def edge_over(tmp_path: Path, upstream: str) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(make_config(tmp_path, upstreams=(upstream,)), KEYRING, engines=[])
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.mark.asyncio
async def test_bytes_from_an_older_upstream_keep_their_etag_through_the_edge(
    tmp_path: Path,
) -> None:
    async with (
        upstream_sending(lambda key: etag_for(key, 1)) as upstream,
        edge_over(tmp_path, upstream) as client,
    ):
        spec = make_spec("Rendered before the upgrade.")
        url = sign(KEYRING, spec)
        async with client.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["ETag"] == etag_for(spec.key, 1)
            assert await resp.read() == BODY
        async with client.get(url, headers={"Range": "bytes=0-9"}) as resp:  # a hit now
            assert resp.status == 206
            assert resp.headers["ETag"] == etag_for(spec.key, 1)
            assert await resp.read() == BODY[:10]
        # A player holding this node's current-revision ETag gets the whole object, not a
        # range of other bytes.
        headers = {"Range": "bytes=0-9", "If-Range": etag_for(spec.key)}
        async with client.get(url, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.read() == BODY


@pytest.mark.asyncio
async def test_an_upstream_etag_for_another_object_is_refused(tmp_path: Path) -> None:
    async with (
        upstream_sending(lambda key: etag_for("0" * 64)) as upstream,
        edge_over(tmp_path, upstream) as client,
    ):
        spec = make_spec("Whose bytes are these?")
        async with client.get(sign(KEYRING, spec)) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"] == "upstream_corrupt"
        assert value_files(client.app) == []
