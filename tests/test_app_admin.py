"""The admin API behind `Authorization: Bearer $NEARVOICE_ADMIN_TOKEN`: purge, stats and
hot keys, on a real server on loopback. The node has no engines, so a miss answers
503 no_renderer: that is how a test sees that an object is really gone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.hot import HotSettings
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.spec import Spec
from tests.support import make_config, make_keyring, make_spec, node_of, payload, put_object, sign

Client = TestClient[Any, Any]
TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring()


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    return TOKEN


@pytest.fixture
async def node(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> tuple[web.Application, Client]:
    app = create_app(make_config(tmp_path), keyring, engines=[])
    return app, await aiohttp_client(app)


async def get_json(client: Client, url: str, status: int = 200, **kwargs: Any) -> Any:
    async with client.get(url, **kwargs) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def post_json(client: Client, url: str, status: int = 200, **kwargs: Any) -> Any:
    async with client.post(url, **kwargs) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def hit(client: Client, keyring: Keyring, spec: Spec) -> bytes:
    async with client.get(sign(keyring, spec)) as resp:
        assert resp.status == 200
        return await resp.read()


# -- access -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/stats"), ("GET", "/admin/hotkeys"), ("POST", "/admin/purge")],
)
async def test_without_an_admin_token_the_api_is_disabled(
    node: Any, monkeypatch: pytest.MonkeyPatch, method: str, path: str
) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    _, client = node
    async with client.request(method, path, headers=AUTH, json={"keys": ["0" * 64]}) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "admin_disabled"


async def test_missing_token_is_401_with_challenge(node: Any, admin_token: str) -> None:
    _, client = node
    async with client.get("/admin/stats") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "unauthorized"


async def test_wrong_token_is_401_with_challenge(node: Any, admin_token: str) -> None:
    _, client = node
    headers = {"Authorization": "Bearer not-the-token"}
    async with client.get("/admin/stats", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "unauthorized"


async def test_other_auth_scheme_is_401(node: Any, admin_token: str) -> None:
    _, client = node
    headers = {"Authorization": f"Basic {TOKEN}"}
    async with client.get("/admin/stats", headers=headers) as resp:
        assert resp.status == 401
        assert "WWW-Authenticate" in resp.headers


async def test_purge_without_a_token_leaves_the_object(
    node: Any, admin_token: str, keyring: Keyring
) -> None:
    app, client = node
    spec = make_spec()
    put_object(app, spec, payload(1000))
    async with client.post("/admin/purge", json={"keys": [spec.key]}) as resp:
        assert resp.status == 401
    assert node_of(app).store.contains(spec.key)


# -- purge --------------------------------------------------------------------------------


async def test_purge_answers_purged_and_missing(
    node: Any, admin_token: str, keyring: Keyring
) -> None:
    app, client = node
    spec = make_spec()
    put_object(app, spec, payload(1000))
    unknown = make_spec("Never stored.").key
    body = await post_json(client, "/admin/purge", headers=AUTH, json={"keys": [spec.key, unknown]})
    assert body == {"purged": [spec.key], "missing": [unknown]}


async def test_purge_of_an_unknown_key_is_missing(node: Any, admin_token: str) -> None:
    _, client = node
    unknown = make_spec("Never stored.").key
    body = await post_json(client, "/admin/purge", headers=AUTH, json={"keys": [unknown]})
    assert body == {"purged": [], "missing": [unknown]}


@pytest.mark.parametrize("hot_limit", [2 * 1024**2, 1024], ids=["memory", "descriptor"])
async def test_purge_removes_the_object_from_disk_and_hot_tier(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    keyring: Keyring,
    admin_token: str,
    hot_limit: int,
) -> None:
    config = make_config(tmp_path, hot=HotSettings(max_object_bytes=hot_limit))
    app = create_app(config, keyring, engines=[])
    client = await aiohttp_client(app)
    spec = make_spec()
    body = payload(50_000)
    put_object(app, spec, body)
    assert await hit(client, keyring, spec) == body  # now held by the hot tier too
    assert node_of(app).hot.get(spec.key, time.time()) is not None

    purged = await post_json(client, "/admin/purge", headers=AUTH, json={"keys": [spec.key]})
    assert purged == {"purged": [spec.key], "missing": []}
    node = node_of(app)
    assert not node.store.contains(spec.key)
    assert node.hot.get(spec.key, time.time()) is None
    assert list(node.store.directory.rglob("*.val")) == []

    # The next request is a miss, never the old bytes: with no engine it is refused as
    # no_renderer (its status is checked in test_app_speech).
    async with client.get(sign(keyring, spec)) as resp:
        assert resp.status != 200
        assert (await resp.json())["error"] == "no_renderer"


async def test_purge_twice_reports_missing_the_second_time(
    node: Any, admin_token: str, keyring: Keyring
) -> None:
    app, client = node
    spec = make_spec()
    put_object(app, spec, payload(1000))
    await post_json(client, "/admin/purge", headers=AUTH, json={"keys": [spec.key]})
    body = await post_json(client, "/admin/purge", headers=AUTH, json={"keys": [spec.key]})
    assert body == {"purged": [], "missing": [spec.key]}


async def test_purge_with_bad_json_is_400(node: Any, admin_token: str) -> None:
    _, client = node
    headers = {**AUTH, "Content-Type": "application/json"}
    body = await post_json(client, "/admin/purge", 400, headers=headers, data=b"{not json")
    assert body["error"] == "bad_json"


@pytest.mark.parametrize(
    "payload_json",
    [{"keys": []}, {"keys": "abc"}, {"nokeys": 1}, ["a"], {"keys": ["0" * 64] * 1001}],
    ids=["empty", "string", "absent", "list", "too-many"],
)
async def test_purge_with_a_bad_key_list_is_400(
    node: Any, admin_token: str, payload_json: Any
) -> None:
    _, client = node
    body = await post_json(client, "/admin/purge", 400, headers=AUTH, json=payload_json)
    assert body["error"] == "bad_keys"


async def test_purge_with_a_malformed_key_is_400_and_purges_nothing(
    node: Any, admin_token: str
) -> None:
    app, client = node
    spec = make_spec()
    put_object(app, spec, payload(1000))
    keys = [spec.key, spec.key.upper()]
    body = await post_json(client, "/admin/purge", 400, headers=AUTH, json={"keys": keys})
    assert body["error"] == "malformed_key"
    assert node_of(app).store.contains(spec.key)


# -- stats --------------------------------------------------------------------------------


async def test_stats_reports_occupancy_and_requests(
    node: Any, admin_token: str, keyring: Keyring
) -> None:
    app, client = node
    specs = [make_spec(f"Line number {i}.") for i in range(2)]
    for spec in specs:
        put_object(app, spec, payload(3000))
    await hit(client, keyring, specs[0])
    async with client.get(sign(keyring, specs[0], ttl=60, now=time.time() - 3600)) as resp:
        assert resp.status == 410

    stats = await get_json(client, "/admin/stats", headers=AUTH)
    assert stats["role"] == "edge"
    disk = stats["disk"]
    assert disk["objects"] == 2
    assert disk["bytes"] >= 2 * 3000
    assert disk["size_limit"] == node_of(app).config.store.size_limit
    assert disk["evictions"] == 0
    assert stats["hot"] == {"objects": 1, "memory_bytes": 3000}
    assert set(stats["requests"]) == {
        "hit",
        "miss",
        "stale",
        "collapsed",
        "bypass",
        "rejected",
        "error",
    }
    assert stats["requests"]["hit"] == 1
    assert stats["requests"]["rejected"] == 1
    assert stats["requests"]["miss"] == 0


# -- hot keys -----------------------------------------------------------------------------


async def test_hotkeys_are_ordered_by_hits(node: Any, admin_token: str, keyring: Keyring) -> None:
    app, client = node
    specs = [make_spec(f"Popular line {i}.") for i in range(3)]
    for spec in specs:
        put_object(app, spec, payload(500))
    for spec, times in zip(specs, (2, 5, 3), strict=True):
        for _ in range(times):
            await hit(client, keyring, spec)

    body = await get_json(client, "/admin/hotkeys?k=10", headers=AUTH)
    assert [(k["key"], k["hits"]) for k in body["keys"]] == [
        (specs[1].key, 5),
        (specs[2].key, 3),
        (specs[0].key, 2),
    ]
    assert all(k["error"] == 0 for k in body["keys"])


async def test_hotkeys_k_limits_the_answer(node: Any, admin_token: str, keyring: Keyring) -> None:
    app, client = node
    specs = [make_spec(f"Popular line {i}.") for i in range(3)]
    for spec in specs:
        put_object(app, spec, payload(500))
    for spec, times in zip(specs, (1, 3, 2), strict=True):
        for _ in range(times):
            await hit(client, keyring, spec)
    body = await get_json(client, "/admin/hotkeys?k=1", headers=AUTH)
    assert [k["key"] for k in body["keys"]] == [specs[1].key]


async def test_rejected_requests_are_not_hot_keys(
    node: Any, admin_token: str, keyring: Keyring
) -> None:
    app, client = node
    spec = make_spec()
    put_object(app, spec, payload(500))
    async with client.get(sign(keyring, spec, ip="10.0.0.0/8")) as resp:
        assert resp.status == 403
    body = await get_json(client, "/admin/hotkeys", headers=AUTH)
    assert body == {"keys": []}


@pytest.mark.parametrize("k", ["0", "1001", "-1", "abc", "", "2.5"])
async def test_hotkeys_k_out_of_range_is_400(node: Any, admin_token: str, k: str) -> None:
    _, client = node
    body = await get_json(client, f"/admin/hotkeys?k={k}", 400, headers=AUTH)
    assert body["error"] == "bad_k"
