"""Regression tests for races between purges, stale copies, prefetches and the hot tier:
each reproduces a sequence found in review. The upstream is a small real aiohttp server
that serves (or fails) on purpose."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from edge.app import create_app
from edge.cache.hot import HotSettings
from edge.cache.meta import etag_for
from edge.config import ADMIN_TOKEN_ENV
from edge.policy import Retention
from edge.spec import Spec
from edge.synth.piper_engine import piper_model_id
from edge.upstream import CHECKSUM_HEADER, UpstreamSettings
from tests.support import make_config, make_keyring, make_spec, payload, put_object, sign

KEYRING = make_keyring()
TOKEN = "admin-token-for-race-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
EXPIRED = Retention().hot + 600  # seconds in the past that makes a hot object stale


def joe(text: str) -> Spec:
    return make_spec(text, voice="joe", model=piper_model_id("joe"))


def open_cache_files(cache: Path) -> int:
    """Descriptors this process holds on object files (`.val`) under `cache`; sockets and
    the index database don't count."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(cache)) and target.endswith(".val")
    return count


async def upstream(aiohttp_server: AiohttpServer, state: dict[str, Any]) -> str:
    async def speech(request: web.Request) -> web.Response:
        state["hits"] += 1
        await asyncio.sleep(state.get("delay", 0))
        if state.get("status", 200) != 200:
            return web.Response(status=state["status"], text="down")
        body: bytes = state["body"]
        digest = hashlib.sha256(body).hexdigest()
        key = request.match_info["tail"].split(".", 1)[0]
        headers = {CHECKSUM_HEADER: digest, "Content-Type": "audio/wav", "ETag": etag_for(key)}
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/speech/{tail:.*}", speech)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def get(client: Any, url: str) -> tuple[int, bytes, str | None]:
    async with client.get(url) as resp:
        return resp.status, await resp.read(), resp.headers.get("Age")


async def test_a_purge_right_after_a_fill_is_not_undone_by_the_lingering_fill(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    state: dict[str, Any] = {"hits": 0, "body": b"OLD" * 400}
    base = await upstream(aiohttp_server, state)
    client = await aiohttp_client(
        create_app(make_config(tmp_path, upstreams=(base,)), KEYRING, engines=[])
    )
    spec = joe("purge me")
    _, first, _ = await get(client, sign(KEYRING, spec))
    state["body"] = b"NEW" * 400
    async with client.post("/admin/purge", json={"keys": [spec.key]}, headers=ADMIN) as resp:
        assert resp.status == 200
    status, second, _ = await get(client, sign(KEYRING, spec))
    assert status == 200
    assert (first, second) == (b"OLD" * 400, b"NEW" * 400)
    assert state["hits"] == 2


async def test_prefetch_refills_stale_objects_and_keeps_no_descriptor(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    state: dict[str, Any] = {"hits": 0, "body": b"fresh" * 1000}
    base = await upstream(aiohttp_server, state)
    config = make_config(tmp_path, hot=HotSettings(max_object_bytes=1024), upstreams=(base,))
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    urls = []
    for i in range(10):
        spec = joe(f"stale {i}")
        put_object(app, spec, payload(4096, i), stored_at=time.time() - EXPIRED)
        urls.append("http://edge" + sign(KEYRING, spec))
    async with client.post("/admin/prefetch", json={"urls": urls}, headers=ADMIN) as resp:
        job = await resp.json()
    report: dict[str, Any] = {}
    for _ in range(200):
        async with client.get(job["progress"], headers=ADMIN) as resp:
            report = await resp.json()
        if report["state"] == "finished":
            break
        await asyncio.sleep(0.05)
    gc.collect()
    assert report["already_cached"] == 0
    assert report["done"] == 10 and report["failed"] == 0
    assert state["hits"] == 10
    assert open_cache_files(tmp_path) == 0


async def test_an_object_is_sent_whole_when_the_hot_tier_holds_no_descriptors(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    config = make_config(tmp_path, hot=HotSettings(max_object_bytes=1024, max_open_files=0))
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    spec = joe("big one")
    body = payload(100_000, 1)
    put_object(app, spec, body)
    async with client.get(sign(KEYRING, spec), timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        assert await resp.read() == body


async def test_requests_that_joined_a_failed_fill_also_get_the_stale_copy(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    state: dict[str, Any] = {"hits": 0, "status": 503, "delay": 0.5}
    base = await upstream(aiohttp_server, state)
    config = make_config(
        tmp_path, upstreams=(base,), upstream=UpstreamSettings(retries=0, failure_threshold=100)
    )
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    spec = joe("stale, shared")
    body = payload(500, 3)
    put_object(app, spec, body, stored_at=time.time() - EXPIRED)
    url = sign(KEYRING, spec)

    async def later(delay: float) -> tuple[int, bytes, str | None]:
        await asyncio.sleep(delay)
        return await get(client, url)

    first, joined = await asyncio.gather(later(0), later(0.2))
    for status, got, age in (first, joined):
        assert (status, got) == (200, body)
        assert age is not None and int(age) >= EXPIRED
