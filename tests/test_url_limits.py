"""Rate limits for signed URLs (docs/contracts.md#rate-limits) on a real node over loopback:
buckets per client address (after trusted proxies) and per key id, hit and miss budgets
apart, 429 with Retry-After and the RateLimit fields, refusals counted by scope, the fast
path spending the same hit budget, and a request over its miss budget never starting a
fill."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.config import HttpSettings
from nearvoice.edge.limits import LimitSettings, Rates
from nearvoice.edge.nodeauth import NODE_HEADER, sign_node_request
from tests.support import (
    EdgeTestServer,
    fast_answers,
    make_config,
    make_keyring,
    make_spec,
    metric,
    payload,
    put_object,
    sign,
)

Client = TestClient[Any, Any]
KID_A = "kida:secret-a-that-is-long-enough-000000"
KID_B = "kidb:secret-b-that-is-long-enough-111111"
VERIFIER = make_keyring(KID_A, KID_B)
SIGNER_A, SIGNER_B = make_keyring(KID_A), make_keyring(KID_B)
BODY = payload(5000, seed=3)


async def start(
    aiohttp_client: AiohttpClient, tmp_path: Path, limits: LimitSettings, **http: Any
) -> Client:
    config = make_config(tmp_path, limits=limits, http=HttpSettings(**http))
    app = create_app(config, VERIFIER, engines=[])
    return await aiohttp_client(EdgeTestServer(app))


async def status_of(client: Client, url: str, **headers: str) -> int:
    async with client.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_hits_over_the_budget_get_429_with_the_ratelimit_fields(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, LimitSettings(hit_rate=0.01, hit_burst=2))
    spec = make_spec("hit budget")
    put_object(client.server.app, spec, BODY)
    url = sign(SIGNER_A, spec)
    assert [await status_of(client, url) for _ in range(2)] == [200, 200]
    async with client.get(url) as resp:
        assert resp.status == 429
        body = await resp.json()
        assert body["error"] == "rate_limited"
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["RateLimit-Policy"].startswith('"ip-hit";q=2;')
        assert resp.headers["RateLimit"].startswith('"ip-hit";r=0;')
    assert await metric(client, "nearvoice_rate_limited_total", scope="hit") == 1
    assert await metric(client, "nearvoice_rate_limited_total", scope="miss") == 0


async def test_the_fast_path_spends_the_same_hit_budget(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(
        aiohttp_client, tmp_path, LimitSettings(hit_rate=0.01, hit_burst=3), fast_path=True
    )
    spec = make_spec("fast budget")
    put_object(client.server.app, spec, BODY)
    url = sign(SIGNER_A, spec)
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    head = f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    statuses = []
    for _ in range(4):
        writer.write(head)
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in answer.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
        statuses.append(int(answer.split()[1]))
    writer.close()
    assert statuses == [200, 200, 200, 429]
    assert fast_answers(client) == 2  # the first verified the URL, the last was refused
    assert await metric(client, "nearvoice_rate_limited_total", scope="hit") == 1


async def test_buckets_are_per_forwarded_client_and_per_key_id(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    limits = LimitSettings(hit_rate=0.01, hit_burst=1)
    client = await start(aiohttp_client, tmp_path, limits, trusted_proxies=("127.0.0.1/32",))
    spec = make_spec("per client and key")
    put_object(client.server.app, spec, BODY)
    url_a, url_b = sign(SIGNER_A, spec), sign(SIGNER_B, spec)
    first, second = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.2"}
    assert await status_of(client, url_a, **first) == 200
    assert await status_of(client, url_b, **second) == 200  # another address, another kid
    assert await status_of(client, url_b, **first) == 429  # first's address is spent
    assert await status_of(client, url_a, **{"X-Forwarded-For": "203.0.113.3"}) == 429  # kid a


async def test_a_request_over_its_miss_budget_starts_no_fill(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, LimitSettings(miss_rate=0.01, miss_burst=1))
    first, second = make_spec("miss one"), make_spec("miss two")
    # No engine and no upstream: an admitted miss starts a fill that fails with 503.
    assert await status_of(client, sign(SIGNER_A, first)) == 503
    errors = await metric(client, "nearvoice_requests_total", result="error")
    assert await status_of(client, sign(SIGNER_A, second)) == 429
    assert await metric(client, "nearvoice_requests_total", result="error") == errors
    assert await metric(client, "nearvoice_rate_limited_total", scope="miss") == 1


async def test_policy_overrides_apply(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    limits = LimitSettings(hit_rate=0.01, hit_burst=1, policy={"hot": Rates()})
    client = await start(aiohttp_client, tmp_path, limits)
    spec = make_spec("hot is unlimited")
    put_object(client.server.app, spec, BODY)
    url = sign(SIGNER_A, spec)
    assert [await status_of(client, url) for _ in range(5)] == [200] * 5


async def test_node_signed_requests_are_not_limited_per_address(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, LimitSettings(hit_rate=0.01, hit_burst=1))
    spec = make_spec("node signed")
    put_object(client.server.app, spec, BODY)
    base = f"http://127.0.0.1:{client.port}"
    url_a, url_b = sign(SIGNER_A, spec), sign(SIGNER_B, spec)
    assert await status_of(client, url_a) == 200  # spends 127.0.0.1's bucket
    assert await status_of(client, url_b) == 429
    signed = {NODE_HEADER: sign_node_request(SIGNER_B, "GET", url_b, base)}
    assert await status_of(client, url_b, **signed) == 200  # kid b's bucket was untouched
