"""Stale-if-error: an edge whose upstream is down serves an expired copy it still has on
disk, with an `Age` header and `nearvoice_requests_total{result="stale"}`; drafts never
get one, and with no expired copy the failure is a quick JSON 502.

The edge has no engine of its own, so every `joe` miss must go upstream; the upstream is a
loopback port nothing listens on. Expired objects are committed straight into the disk
store with a `stored_at` older than their TTL.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.hot import HotSettings
from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.policy import Policy, Retention
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.upstream import UpstreamSettings
from tests.support import (
    make_config,
    make_keyring,
    make_spec,
    metric,
    metric_from,
    node_of,
    payload,
    put_object,
    scrape,
    sign,
)

Client = TestClient[Any, Any]
KEYRING = make_keyring()
SETTINGS = UpstreamSettings(connect_timeout=0.3, first_byte_timeout=0.5)
EXPIRED_FOR = 600  # seconds past its TTL that the stale copy is
FAULT_BOUND = SETTINGS.first_byte_timeout + 2.0  # seconds a failing miss may take at most
_CASES = itertools.count(1)


def closed_port_base() -> str:
    """A loopback base URL nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def joe(text: str = "Joe said this a long time ago.") -> Spec:
    """A joe spec with a key no other test uses (this edge cannot render joe)."""
    return make_spec(f"{text} Case {next(_CASES)}.", voice="joe", model=piper_model_id("joe"))


@pytest.fixture
async def edge(aiohttp_client: AiohttpClient, tmp_path: Path) -> tuple[web.Application, Client]:
    """An edge with no engines whose only upstream is down."""
    config = make_config(tmp_path, upstreams=(closed_port_base(),), upstream=SETTINGS)
    app = create_app(config, KEYRING, engines=[])
    return app, await aiohttp_client(app)


def put_expired(
    app: web.Application, spec: Spec, body: bytes, policy: Policy = Policy.HOT
) -> ObjectMeta:
    """Commits `body` for `spec` with a stored_at EXPIRED_FOR seconds past its TTL."""
    stored_at = time.time() - Retention().ttl(policy) - EXPIRED_FOR
    meta = put_object(app, spec, body, policy=policy, stored_at=stored_at, content_type="audio/wav")
    assert not meta.fresh(time.time())
    return meta


async def test_expired_copy_is_served_when_the_upstream_is_down(edge: Any) -> None:
    app, client = edge
    spec = joe()
    body = payload(5000)
    put_expired(app, spec, body)
    async with client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "audio/wav"
        assert await resp.read() == body


async def test_stale_answer_carries_its_age(edge: Any) -> None:
    app, client = edge
    spec = joe()
    meta = put_expired(app, spec, payload(5000))
    elapsed = int(time.time() - meta.stored_at)
    async with client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        age = int(resp.headers["Age"])
    assert age >= elapsed
    assert age <= int(time.time() - meta.stored_at) + 1


@pytest.mark.parametrize("policy", [Policy.HOT, Policy.PERSONAL])
async def test_stale_answer_is_counted_as_stale(edge: Any, policy: Policy) -> None:
    app, client = edge
    spec = joe()
    put_expired(app, spec, payload(5000), policy=policy)
    async with client.get(sign(KEYRING, spec, policy=policy)) as resp:
        assert resp.status == 200
        await resp.read()
    text = await scrape(client)
    assert metric_from(text, "nearvoice_requests_total", result="stale") == 1
    assert metric_from(text, "nearvoice_requests_total", result="hit") == 0
    assert metric_from(text, "nearvoice_requests_total", result="error") == 0


async def test_stale_answer_honours_range(edge: Any) -> None:
    app, client = edge
    spec = joe()
    body = payload(5000)
    put_expired(app, spec, body)
    async with client.get(sign(KEYRING, spec), headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{len(body)}"
        assert "Age" in resp.headers
        assert await resp.read() == body[100:200]


async def test_upstream_was_tried_before_serving_stale(edge: Any) -> None:
    app, client = edge
    spec = joe()
    put_expired(app, spec, payload(5000))
    async with client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
    assert await metric(client, "nearvoice_upstream_requests_total", reason="no_engine") == 1


async def test_fresh_copy_has_no_age_and_is_a_hit(edge: Any) -> None:
    app, client = edge
    spec = joe()
    put_object(app, spec, payload(5000), content_type="audio/wav")
    async with client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        assert "Age" not in resp.headers
    assert await metric(client, "nearvoice_requests_total", result="hit") == 1
    assert await metric(client, "nearvoice_upstream_requests_total", reason="no_engine") == 0


async def test_expired_copy_is_served_when_the_upstream_hangs(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """An upstream that accepts connections and never answers: the first-byte timeout
    fails the fill, and the expired copy is served."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads
        base = f"http://127.0.0.1:{silent.getsockname()[1]}"
        app = create_app(
            make_config(tmp_path, upstreams=(base,), upstream=SETTINGS), KEYRING, engines=[]
        )
        client = await aiohttp_client(app)
        spec = joe()
        body = payload(5000)
        put_expired(app, spec, body)
        async with client.get(sign(KEYRING, spec)) as resp:
            assert resp.status == 200
            assert "Age" in resp.headers
            assert await resp.read() == body
        assert await metric(client, "nearvoice_requests_total", result="stale") == 1


async def test_large_expired_copy_is_served_from_its_file_and_released(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A copy too large for the hot tier's memory is sent from its descriptor, which is
    closed afterwards."""
    config = make_config(
        tmp_path,
        upstreams=(closed_port_base(),),
        upstream=SETTINGS,
        hot=HotSettings(max_object_bytes=1024),
    )
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    spec = joe()
    body = payload(300_000)
    put_expired(app, spec, body)
    for _ in range(3):
        async with client.get(sign(KEYRING, spec)) as resp:
            assert resp.status == 200
            assert "Age" in resp.headers
            assert await resp.read() == body
    assert await metric(client, "nearvoice_requests_total", result="stale") == 3
    assert open_value_files(app) == []


def open_value_files(app: web.Application) -> list[str]:
    """The paths of this process's open descriptors that point into the node's store."""
    store = str(node_of(app).store.directory)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if path.startswith(store) and path.endswith(".val"):
            found.append(path)
    return found


async def test_draft_never_gets_a_stale_copy(edge: Any) -> None:
    app, client = edge
    spec = joe()
    put_expired(app, spec, payload(5000))
    async with client.get(sign(KEYRING, spec, policy=Policy.DRAFT)) as resp:
        assert resp.status in (502, 503)
        assert resp.content_type == "application/json"
        answer = await resp.json()
    assert answer["error"].startswith("upstream_")
    text = await scrape(client)
    assert metric_from(text, "nearvoice_requests_total", result="stale") == 0


async def test_draft_with_a_fresh_copy_on_disk_still_goes_upstream(edge: Any) -> None:
    app, client = edge
    spec = joe()
    put_object(app, spec, payload(5000), content_type="audio/wav")
    async with client.get(sign(KEYRING, spec, policy=Policy.DRAFT)) as resp:
        assert resp.status in (502, 503)
        assert resp.content_type == "application/json"


async def test_without_an_expired_copy_the_miss_is_a_quick_json_502(edge: Any) -> None:
    _, client = edge
    spec = joe()
    started = time.monotonic()
    async with client.get(sign(KEYRING, spec)) as resp:
        status = resp.status
        assert resp.content_type == "application/json"
        answer = await resp.json()
    took = time.monotonic() - started
    assert status == 502
    assert answer["error"] == "upstream_unavailable"
    assert took < FAULT_BOUND  # a bound on the fault path, not a speed claim
    text = await scrape(client)
    assert metric_from(text, "nearvoice_requests_total", result="error") == 1
    assert metric_from(text, "nearvoice_requests_total", result="stale") == 0


async def test_failed_miss_leaves_the_expired_copy_in_place(edge: Any) -> None:
    app, client = edge
    spec = joe()
    body = payload(5000)
    put_expired(app, spec, body)
    for _ in range(2):
        async with client.get(sign(KEYRING, spec)) as resp:
            assert resp.status == 200
            assert await resp.read() == body
    assert node_of(app).store.contains(spec.key)
    assert await metric(client, "nearvoice_requests_total", result="stale") == 2


async def test_an_upstreams_410_is_relayed_and_never_masked_by_a_stale_copy(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A 410 is the upstream's answer, not an error (RFC 5861 section 4: only 500, 502,
    503 and 504 are): the player gets it, with its code, and no expired copy."""

    async def gone(_request: web.Request) -> web.Response:
        body = {"error": "unknown_ref", "message": "reference voice ref_x was deleted"}
        return web.json_response(body, status=410)

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", gone)
    upstream = await aiohttp_client(upstream_app)
    base = str(upstream.make_url("")).rstrip("/")
    app = create_app(
        make_config(tmp_path, upstreams=(base,), upstream=SETTINGS), KEYRING, engines=[]
    )
    client = await aiohttp_client(app)
    spec = joe()
    put_expired(app, spec, payload(5000))
    async with client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 410
        assert resp.headers["Content-Type"].startswith("application/json")
        assert (await resp.json())["error"] == "unknown_ref"
    assert await metric(client, "nearvoice_requests_total", result="stale") == 0
    assert await metric(client, "nearvoice_requests_total", result="error") == 0  # 5xx only
    assert await metric(client, "nearvoice_requests_total", result="rejected") == 1
