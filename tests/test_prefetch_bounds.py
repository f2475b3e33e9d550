"""Prefetch within bounds: drafts are refused, a job can be cancelled, and prefetch renders
wait behind players' misses. The engine is the real hibari engine, held in its first
render by an event the test controls (as tests/test_engine_faults.py wraps it), so which
queued render starts next is observed, not timed."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.meta import etag_for
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.policy import Policy
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.upstream import CHECKSUM_HEADER
from tests.support import (
    WrappedEngine,
    eventually,
    make_config,
    make_keyring,
    make_spec,
    node_of,
    sign,
    wait_ready,
)

Client = TestClient[Any, Any]
KEYRING = make_keyring()
TOKEN = "admin-token-for-prefetch-bounds"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
WAIT_LIMIT = 60.0  # seconds a held render waits for the go-ahead at most
HOLD = "The first render waits for the test."


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)


class HeldEngine(WrappedEngine):
    """The real engine, recording the order renders start in; the render of `HOLD`
    waits for `go` before its first sentence."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner)
        self.go = threading.Event()
        self.started: list[str] = []

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        self.started.append(text)
        if text == HOLD:
            self.go.wait(WAIT_LIMIT)
        yield from self._inner.stream(text, voice, speed, seed)


async def get(client: Client, url: str) -> int:
    async with client.get(url) as resp:
        await resp.read()
        return resp.status


@pytest.mark.slow
async def test_a_queued_player_miss_starts_before_a_queued_prefetch(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    engine = HeldEngine(HibariEngine(threads=1))
    app = create_app(make_config(tmp_path), KEYRING, engines=[engine])  # one inference thread
    client = await aiohttp_client(app)
    await wait_ready(client)
    engine.started.clear()  # warm-up renders
    try:
        holding = asyncio.create_task(get(client, sign(KEYRING, make_spec(HOLD))))
        await eventually(lambda: engine.started == [HOLD], WAIT_LIMIT)

        async with client.post(
            "/admin/prefetch",
            json={"specs": [{"text": "Warmed in the background."}]},
            headers=ADMIN,
        ) as resp:
            assert resp.status == 202
        await wait_depth(app, 2)  # the prefetch render is queued behind the held one
        player = asyncio.create_task(get(client, sign(KEYRING, make_spec("A player waits."))))
        await wait_depth(app, 3)
    finally:
        engine.go.set()
    assert await holding == 200 and await player == 200
    await eventually(lambda: len(engine.started) == 3, WAIT_LIMIT)
    assert engine.started == [HOLD, "A player waits.", "Warmed in the background."]


async def wait_depth(app: web.Application, depth: int) -> None:
    """Until `depth` renders are queued or running (nearvoice_render_queue_depth)."""
    gauge = node_of(app).metrics.render_queue

    def reached() -> bool:
        return any(s.value >= depth for family in gauge.collect() for s in family.samples)

    await eventually(reached, WAIT_LIMIT)


@pytest.mark.slow
async def test_a_player_joining_a_queued_prefetch_moves_it_up(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    engine = HeldEngine(HibariEngine(threads=1))
    app = create_app(make_config(tmp_path), KEYRING, engines=[engine])
    client = await aiohttp_client(app)
    await wait_ready(client)
    engine.started.clear()
    try:
        holding = asyncio.create_task(get(client, sign(KEYRING, make_spec(HOLD))))
        await eventually(lambda: engine.started == [HOLD], WAIT_LIMIT)
        specs = [{"text": "Warmed first."}, {"text": "Also wanted by a player."}]
        async with client.post("/admin/prefetch", json={"specs": specs}, headers=ADMIN) as resp:
            assert resp.status == 202
        await wait_depth(app, 3)  # both prefetch renders queued (concurrency 2)
        joined = asyncio.create_task(
            get(client, sign(KEYRING, make_spec("Also wanted by a player.")))
        )
        await eventually(
            lambda: any(f.readers == 2 for f in node_of(app)._fills.values()), WAIT_LIMIT
        )
    finally:
        engine.go.set()
    assert await holding == 200 and await joined == 200
    await eventually(lambda: len(engine.started) == 3, WAIT_LIMIT)
    assert engine.started == [HOLD, "Also wanted by a player.", "Warmed first."]


async def test_drafts_are_refused(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path), KEYRING, engines=[]))
    draft_url = "http://edge" + sign(KEYRING, make_spec("draft"), policy=Policy.DRAFT)
    for body in ({"specs": [{"text": "x", "policy": "draft"}]}, {"urls": [draft_url]}):
        async with client.post("/admin/prefetch", json=body, headers=ADMIN) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "draft_prefetch"


@pytest.fixture
async def held_upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[dict[str, Any]]:
    """A real upstream that answers each GET only once `release` is set."""
    state: dict[str, Any] = {"hits": 0, "release": asyncio.Event()}

    async def speech(request: web.Request) -> web.Response:
        state["hits"] += 1
        await state["release"].wait()
        body = b"audio" * 200
        digest = hashlib.sha256(body).hexdigest()
        key = request.match_info["tail"].split(".")[0]
        headers = {CHECKSUM_HEADER: digest, "Content-Type": "audio/wav", "ETag": etag_for(key)}
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/speech/{tail:.*}", speech)
    server = await aiohttp_server(app)
    state["base"] = str(server.make_url("")).rstrip("/")
    yield state
    state["release"].set()


async def test_a_cancelled_job_starts_no_further_item(
    aiohttp_client: AiohttpClient, tmp_path: Path, held_upstream: dict[str, Any]
) -> None:
    config = make_config(tmp_path, upstreams=(held_upstream["base"],))
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    specs = [
        make_spec(f"cancel me {n}", voice="joe", model=piper_model_id("joe")) for n in range(6)
    ]
    urls = ["http://edge" + sign(KEYRING, spec) for spec in specs]
    async with client.post("/admin/prefetch", json={"urls": urls}, headers=ADMIN) as resp:
        job = await resp.json()
    await eventually(lambda: held_upstream["hits"] == 2)  # [prefetch] concurrency
    async with client.delete(job["progress"], headers=ADMIN) as resp:
        assert resp.status == 200
        assert (await resp.json())["state"] == "cancelled"
    held_upstream["release"].set()
    node = node_of(app)
    await eventually(lambda: sum(node.store.contains(s.key) for s in specs) == 2)
    await eventually(lambda: not any(f.is_running() for f in node._fills.values()))
    assert held_upstream["hits"] == 2
    async with client.get(job["progress"], headers=ADMIN) as resp:
        report = await resp.json()
    assert report["state"] == "cancelled" and report["done"] < report["total"]
    async with client.delete("/admin/prefetch/0123456789abcdef", headers=ADMIN) as resp:
        assert resp.status == 404
