"""An engine that fails mid-render, through the app: fault injection through the public
Engine interface (the real HibariEngine, made to raise after N sentences), not a mock.

Failing before any byte: 503 `render_failed` with Retry-After, nothing stored, and the next
request renders afresh; or, with an upstream configured, the miss is fetched from it
(reason `engine_error`) and cached. Failing after bytes went out: the client sees a broken
transfer, never a complete-looking short object, and nothing is stored.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer

from nearvoice.edge.app import create_app
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.upstream import UpstreamSettings
from tests.support import (
    WrappedEngine,
    eventually,
    make_config,
    make_keyring,
    make_spec,
    metric,
    node_of,
    sign,
    wait_ready,
)

pytestmark = pytest.mark.slow

Client = TestClient[Any, Any]
TEXT = "The first sentence renders. The second one never does. Nor does the third."
WAIT_LIMIT = 30.0  # seconds a failing render waits for the test's go-ahead at most


class FailingEngine(WrappedEngine):
    """The real engine, raising RuntimeError once it has yielded `fail_after` sentences.

    With `go_ahead`, it waits for that event before raising, so a test can first make
    sure the sentences already yielded reached the client."""

    def __init__(
        self, inner: Engine, fail_after: int, go_ahead: threading.Event | None = None
    ) -> None:
        super().__init__(inner)
        self.fail_after = fail_after
        self.go_ahead = go_ahead

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        for index, audio in enumerate(self._inner.stream(text, voice, speed, seed)):
            if index == self.fail_after:
                break
            yield audio
        if self.go_ahead is not None:
            self.go_ahead.wait(WAIT_LIMIT)
        raise RuntimeError(f"injected engine fault after {self.fail_after} sentence(s)")


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring()


async def start_edge(
    aiohttp_client: AiohttpClient,
    data: Path,
    keyring: Keyring,
    engines: list[Engine] | None,
    **config: Any,
) -> tuple[web.Application, Client]:
    app = create_app(make_config(data, **config), keyring, engines=engines)
    client = await aiohttp_client(app)
    await wait_ready(client)
    return app, client


@pytest.fixture
async def failing_at_start(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> tuple[web.Application, Client]:
    """An edge without upstreams whose engine fails before its first sentence."""
    engine = FailingEngine(HibariEngine(threads=1), fail_after=0)
    return await start_edge(aiohttp_client, tmp_path, keyring, [engine])


@pytest.fixture
async def failing_after_one(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> AsyncIterator[tuple[web.Application, Client, threading.Event]]:
    """An edge without upstreams whose engine fails after one sentence, once allowed."""
    go_ahead = threading.Event()
    engine = FailingEngine(HibariEngine(threads=1), fail_after=1, go_ahead=go_ahead)
    app, client = await start_edge(aiohttp_client, tmp_path, keyring, [engine])
    yield app, client, go_ahead
    go_ahead.set()


async def fetch(client: Client, url: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.get(url) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def synths(client: Client) -> float:
    return await metric(client, "nearvoice_synth_total", engine="hibari")


# -- failing before the first byte, no upstream --------------------------------------------


async def test_render_failing_before_any_byte_is_503_render_failed(
    failing_at_start: Any, keyring: Keyring
) -> None:
    _, client = failing_at_start
    async with client.get(sign(keyring, make_spec(TEXT))) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"] == "render_failed"
        assert int(resp.headers["Retry-After"]) > 0


async def test_render_failing_before_any_byte_stores_nothing(
    failing_at_start: Any, keyring: Keyring
) -> None:
    app, client = failing_at_start
    spec = make_spec(TEXT)
    status, _, _ = await fetch(client, sign(keyring, spec))
    assert status == 503
    node = node_of(app)
    assert not node.store.contains(spec.key)
    assert node.store.count() == 0
    assert await node.lookup(spec.key) is None


async def test_request_after_a_failed_render_starts_a_fresh_render(
    failing_at_start: Any, keyring: Keyring
) -> None:
    _, client = failing_at_start
    url = sign(keyring, make_spec(TEXT))
    status, _, _ = await fetch(client, url)
    assert status == 503
    assert await synths(client) == 1

    status, _, _ = await fetch(client, url)
    assert status == 503
    assert await synths(client) == 2
    assert await metric(client, "nearvoice_render_queue_depth") == 0


async def test_failed_render_counts_an_error(failing_at_start: Any, keyring: Keyring) -> None:
    _, client = failing_at_start
    status, _, _ = await fetch(client, sign(keyring, make_spec(TEXT)))
    assert status == 503
    assert await metric(client, "nearvoice_requests_total", result="error") == 1
    assert await metric(client, "nearvoice_requests_total", result="miss") == 0


# -- failing after bytes went out, no upstream ---------------------------------------------


async def test_render_failing_mid_stream_breaks_the_transfer(
    failing_after_one: Any, keyring: Keyring
) -> None:
    _, client, go_ahead = failing_after_one
    async with client.get(sign(keyring, make_spec(TEXT))) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        assert first  # the first sentence went out before the engine failed
        go_ahead.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_render_failing_mid_stream_stores_nothing(
    failing_after_one: Any, keyring: Keyring
) -> None:
    app, client, go_ahead = failing_after_one
    spec = make_spec(TEXT)
    async with client.get(sign(keyring, spec)) as resp:
        assert await resp.content.readany()
        go_ahead.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()

    node = node_of(app)
    await eventually(lambda: spec.key not in node._fills)
    assert not node.store.contains(spec.key)
    assert node.store.count() == 0
    assert await node.lookup(spec.key) is None


# -- failing before the first byte, with an upstream ---------------------------------------


@pytest.fixture
async def failing_with_upstream(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    keyring: Keyring,
) -> tuple[web.Application, Client, Client]:
    """Edge A (engine fails before any byte) with edge B (real hibari) as its upstream."""
    upstream_app = create_app(make_config(tmp_path / "b"), keyring)
    upstream_server = await aiohttp_server(upstream_app)
    upstream: Client = await aiohttp_client(upstream_server)
    await wait_ready(upstream)
    base = str(upstream_server.make_url("")).rstrip("/")
    engine = FailingEngine(HibariEngine(threads=1), fail_after=0)
    app, client = await start_edge(
        aiohttp_client,
        tmp_path / "a",
        keyring,
        [engine],
        upstreams=(base,),
        upstream=UpstreamSettings(connect_timeout=2.0, first_byte_timeout=10.0, deadline=12.0),
    )
    return app, client, upstream


async def test_render_failure_falls_back_to_the_upstream(
    failing_with_upstream: Any, keyring: Keyring
) -> None:
    _, client, upstream = failing_with_upstream
    url = sign(keyring, make_spec(TEXT))
    status, _, body = await fetch(client, url)
    assert status == 200
    assert await synths(client) == 1  # the local attempt
    assert await synths(upstream) == 1  # the upstream's render
    assert await metric(client, "nearvoice_upstream_requests_total", reason="engine_error") == 1
    _, _, upstream_body = await fetch(upstream, url)
    assert body == upstream_body


async def test_object_fetched_after_a_render_failure_is_cached(
    failing_with_upstream: Any, keyring: Keyring
) -> None:
    app, client, upstream = failing_with_upstream
    spec = make_spec(TEXT)
    url = sign(keyring, spec)
    status, _, first = await fetch(client, url)
    assert status == 200
    await eventually(lambda: node_of(app).store.contains(spec.key))

    status, _, second = await fetch(client, url)
    assert status == 200
    assert second == first
    assert await metric(client, "nearvoice_requests_total", result="hit") == 1
    assert await synths(client) == 1
    assert await metric(upstream, "nearvoice_requests_total", result="miss") == 1
    # One more request upstream: the HEAD that confirms the checksum of the object it
    # streamed (a hit, or collapsed onto the fill if it came while that was committing).
    hits = await metric(upstream, "nearvoice_requests_total", result="hit")
    assert hits + await metric(upstream, "nearvoice_requests_total", result="collapsed") == 1
