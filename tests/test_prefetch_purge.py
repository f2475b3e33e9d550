"""Prefetch jobs (`POST /admin/prefetch`, `GET /admin/prefetch/{id}`) and cascading purge
(`POST /admin/purge` with `"cascade": true`), on real servers on loopback.

Prefetches that render use one module-wide edge with a real hibari engine (warm before the
first test); each test uses its own texts and reads metrics as differences. Everything
else runs on nodes without engines, where a miss can only fail: that is how a test sees
that nothing was rendered. The cascade tests wire two apps as edge A and shield B, the
way tests/test_upstream.py does, and share the admin token through the environment.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.config import ADMIN_TOKEN_ENV, OriginSettings, Role, SynthSettings
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.node import Node
from nearvoice.edge.prefetch import PrefetchSettings
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.token import speech_path
from nearvoice.origin.app import create_origin_app
from nearvoice.origin.store import FilesystemStore
from tests.support import (
    eventually,
    make_config,
    make_keyring,
    make_spec,
    metric_from,
    node_of,
    payload,
    put_object,
    scrape,
    sign,
    wait_ready,
)

Client = TestClient[Any, Any]
KEYRING = make_keyring()
TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PUBLIC = "http://edge.example.test"  # prefetch URLs are full player URLs; the host is not used
JOB_TIMEOUT = 120.0  # seconds a prefetch job may take (renders on a small CPU)
_CASES = itertools.count(1)

in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    return TOKEN


def heart(text: str = "Prefetched before anyone asked.") -> Spec:
    """A heart spec with a key no other test uses."""
    return make_spec(f"{text} Case {next(_CASES)}.")


def player_url(spec: Spec, **kwargs: Any) -> str:
    return PUBLIC + sign(KEYRING, spec, **kwargs)


async def post_json(client: Client, url: str, status: int, **kwargs: Any) -> Any:
    async with client.post(url, **kwargs) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def get_json(client: Client, url: str, status: int = 200, **kwargs: Any) -> Any:
    async with client.get(url, **kwargs) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def start_job(client: Client, body: Any) -> dict[str, Any]:
    answer = await post_json(client, "/admin/prefetch", 202, headers=AUTH, json=body)
    assert isinstance(answer, dict)
    return answer


async def finished(client: Client, job_id: str) -> dict[str, Any]:
    """Polls the job's progress until it has finished; returns the final report."""
    async with asyncio.timeout(JOB_TIMEOUT):
        while True:
            report = await get_json(client, f"/admin/prefetch/{job_id}", headers=AUTH)
            if report["state"] == "finished":
                assert isinstance(report, dict)
                return report
            assert report["state"] == "running"
            await asyncio.sleep(0.05)


async def prefetch(client: Client, body: Any) -> dict[str, Any]:
    """Starts a job and waits for it to finish."""
    job = await start_job(client, body)
    return await finished(client, job["id"])


# -- prefetch that renders: one warm edge for the module -----------------------------------


@dataclass
class Served:
    app: web.Application
    client: Client

    @property
    def node(self) -> Node:
        return node_of(self.app)

    async def metrics(self) -> str:
        return await scrape(self.client)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def renderer(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """An edge that renders heart with a real hibari engine, ready (warm)."""
    data = tmp_path_factory.mktemp("prefetch")
    app = create_app(make_config(data), KEYRING, engines=[HibariEngine(("heart",), threads=1)])
    async with TestClient(TestServer(app)) as client:
        await wait_ready(client)
        yield Served(app, client)


def delta(before: str, after: str, sample: str, **labels: str) -> float:
    return metric_from(after, sample, **labels) - metric_from(before, sample, **labels)


@pytest.mark.slow
@in_module_loop
async def test_prefetch_of_signed_urls_answers_202_with_a_job(
    renderer: Served, admin_token: str
) -> None:
    urls = [player_url(heart()), player_url(heart())]
    job = await start_job(renderer.client, {"urls": urls})
    assert isinstance(job["id"], str) and job["id"]
    assert job["total"] == 2
    assert job["progress"] == f"/admin/prefetch/{job['id']}"
    assert job["state"] in ("running", "finished")
    await finished(renderer.client, job["id"])


@pytest.mark.slow
@in_module_loop
async def test_prefetch_job_of_uncached_urls_finishes_with_every_item_done(
    renderer: Served, admin_token: str
) -> None:
    urls = [player_url(heart()), player_url(heart()), player_url(heart())]
    report = await prefetch(renderer.client, {"urls": urls})
    assert report["total"] == 3
    assert report["done"] == 3
    assert report["failed"] == 0
    assert report["already_cached"] == 0
    assert report["errors"] == []


@pytest.mark.slow
@in_module_loop
async def test_prefetched_urls_are_then_hits_without_rendering(
    renderer: Served, admin_token: str
) -> None:
    specs = [heart(), heart()]
    await prefetch(renderer.client, {"urls": [player_url(s) for s in specs]})
    before = await renderer.metrics()
    for spec in specs:
        async with renderer.client.get(sign(KEYRING, spec)) as resp:
            assert resp.status == 200
            assert (await resp.read())[:4] == b"RIFF"
    after = await renderer.metrics()
    assert delta(before, after, "nearvoice_requests_total", result="hit") == 2
    assert delta(before, after, "nearvoice_requests_total", result="miss") == 0
    assert delta(before, after, "nearvoice_synth_total", engine="hibari") == 0


@pytest.mark.slow
@in_module_loop
async def test_prefetch_renders_each_object_once(renderer: Served, admin_token: str) -> None:
    spec = heart()
    before = await renderer.metrics()
    report = await prefetch(renderer.client, {"urls": [player_url(spec)] * 3})
    after = await renderer.metrics()
    assert report["done"] == 3 and report["failed"] == 0
    assert delta(before, after, "nearvoice_synth_total", engine="hibari") == 1


@pytest.mark.slow
@in_module_loop
async def test_prefetch_of_specs_signs_and_renders_them(renderer: Served, admin_token: str) -> None:
    spec = heart("An admin-trusted spec, no URL needed.")
    report = await prefetch(renderer.client, {"specs": [{"text": spec.text, "voice": "heart"}]})
    assert report["done"] == 1
    assert report["failed"] == 0
    assert renderer.node.store.contains(spec.key)

    before = await renderer.metrics()
    async with renderer.client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
    after = await renderer.metrics()
    assert delta(before, after, "nearvoice_requests_total", result="hit") == 1
    assert delta(before, after, "nearvoice_synth_total", engine="hibari") == 0


@pytest.mark.slow
@in_module_loop
async def test_prefetch_of_a_spec_honours_its_fields(renderer: Served, admin_token: str) -> None:
    spec = make_spec(f"Faster and seeded. Case {next(_CASES)}.", speed=1.5, seed=3)
    item = {"text": spec.text, "voice": "heart", "format": "wav", "speed": 1.5, "seed": 3}
    report = await prefetch(renderer.client, {"specs": [item]})
    assert report["done"] == 1 and report["failed"] == 0
    assert renderer.node.store.contains(spec.key)
    # The expressive controls too (a duration, a language).
    fitted = Spec.create(
        text=f"Fitted ahead of time. Case {next(_CASES)}.",
        voice="heart",
        format=AudioFormat.WAV,
        model=spec.model,
        duration=2.0,
        lang="en-US",
    )
    item = {"text": fitted.text, "voice": "heart", "duration": 2.0, "lang": "en-US"}
    report = await prefetch(renderer.client, {"specs": [item]})
    assert report["done"] == 1 and report["failed"] == 0
    assert renderer.node.store.contains(fitted.key)


# -- prefetch without rendering -------------------------------------------------------------


@pytest.fixture
async def bare(aiohttp_client: AiohttpClient, tmp_path: Path) -> Served:
    """An edge without engines or upstreams: anything it has not got, it cannot fill."""
    app = create_app(make_config(tmp_path), KEYRING, engines=[])
    return Served(app, await aiohttp_client(app))


async def test_already_cached_urls_count_as_already_cached(bare: Served, admin_token: str) -> None:
    spec = heart()
    put_object(bare.app, spec, payload(2000))
    report = await prefetch(bare.client, {"urls": [player_url(spec)]})
    assert report["done"] == 1
    assert report["already_cached"] == 1
    assert report["failed"] == 0


async def test_already_cached_specs_count_as_already_cached(bare: Served, admin_token: str) -> None:
    spec = heart()
    put_object(bare.app, spec, payload(2000))
    report = await prefetch(bare.client, {"specs": [{"text": spec.text}]})
    assert (report["done"], report["already_cached"], report["failed"]) == (1, 1, 0)


async def test_prefetch_of_a_cached_object_is_not_a_request(bare: Served, admin_token: str) -> None:
    spec = heart()
    put_object(bare.app, spec, payload(2000))
    before = await bare.metrics()
    await prefetch(bare.client, {"urls": [player_url(spec)]})
    after = await bare.metrics()
    for result in ("hit", "miss", "error"):
        assert delta(before, after, "nearvoice_requests_total", result=result) == 0


async def test_expired_url_item_is_reported_failed_with_its_code(
    bare: Served, admin_token: str
) -> None:
    spec = heart()
    put_object(bare.app, spec, payload(2000))  # cached, yet an expired URL must not count
    expired = player_url(spec, ttl=60, now=time.time() - 3600)
    report = await prefetch(bare.client, {"urls": [expired]})
    assert report["done"] == 1
    assert report["failed"] == 1
    assert report["already_cached"] == 0
    assert report["errors"] == [f"{speech_path(spec)}: expired"]


async def test_forged_url_item_is_reported_failed_with_its_code(
    bare: Served, admin_token: str
) -> None:
    spec = heart()
    forged = player_url(spec).replace("p=hot", "p=personal")
    report = await prefetch(bare.client, {"urls": [forged]})
    assert report["failed"] == 1
    assert report["errors"] == [f"{speech_path(spec)}: bad_signature"]


async def test_one_failed_item_does_not_stop_the_job(bare: Served, admin_token: str) -> None:
    cached, expired = heart(), heart()
    put_object(bare.app, cached, payload(2000))
    urls = [player_url(expired, ttl=60, now=time.time() - 3600), player_url(cached)]
    report = await prefetch(bare.client, {"urls": urls})
    assert report["total"] == report["done"] == 2
    assert report["failed"] == 1
    assert report["already_cached"] == 1


async def test_item_that_cannot_be_filled_is_reported_failed(
    bare: Served, admin_token: str
) -> None:
    spec = heart()
    report = await prefetch(bare.client, {"urls": [player_url(spec)]})
    assert report["failed"] == 1
    assert report["errors"] == [f"{speech_path(spec)}: no_renderer"]
    assert not bare.node.store.contains(spec.key)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "bad_json"),
        (b"[]", "bad_json"),
        (b'"urls"', "bad_json"),
        (b"{}", "bad_items"),
        (b'{"urls": []}', "bad_items"),
        (b'{"urls": "http://x/v1/speech/a.wav"}', "bad_items"),
        (b'{"specs": {"text": "x"}}', "bad_items"),
        (b'{"urls": [42]}', "bad_items"),
        (b'{"urls": ["http://edge.example.test/elsewhere?x=1"]}', "bad_items"),
        (b'{"specs": [{"voice": "heart"}]}', "bad_items"),
        (b'{"specs": ["just text"]}', "bad_items"),
        (b'{"specs": [{"text": "x", "voice": "nobody"}]}', "unknown_voice"),
        (b'{"specs": [{"text": "x", "format": "aiff"}]}', "bad_items"),
        (b'{"specs": [{"text": "x", "policy": "forever"}]}', "bad_items"),
        (b'{"specs": [{"text": "x", "speed": 9}]}', "bad_items"),
        (b'{"specs": [{"text": "   "}]}', "bad_items"),
    ],
    ids=[
        "broken-json", "list", "string", "no-items", "empty-urls", "urls-not-list",
        "specs-not-list", "url-not-string", "not-a-speech-url", "spec-without-text",
        "spec-not-object", "unknown-voice", "unknown-format", "unknown-policy", "bad-speed",
        "empty-text",
    ],
)  # fmt: skip
async def test_bad_prefetch_bodies_are_400(
    bare: Served, admin_token: str, body: bytes, code: str
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    answer = await post_json(bare.client, "/admin/prefetch", 400, headers=headers, data=body)
    assert answer["error"] == code
    assert bare.node.prefetcher.jobs == {}


async def test_spec_item_over_the_text_limit_is_400(
    aiohttp_client: AiohttpClient, tmp_path: Path, admin_token: str
) -> None:
    """A spec item is held to the node's text limit, as a URL (and the minting API) is:
    otherwise an admin prefetch renders text that every player URL for it is refused."""
    config = make_config(tmp_path, synth=SynthSettings(workers=1, max_text_chars=40))
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    body = {"specs": [{"text": "y" * 41}]}
    async with client.post("/admin/prefetch", headers=AUTH, json=body) as resp:
        status, answer = resp.status, await resp.json()
    assert (status, answer.get("error")) == (400, "text_too_long"), answer
    assert node_of(app).prefetcher.jobs == {}


async def test_spec_item_with_a_fractional_seed_is_400(bare: Served, admin_token: str) -> None:
    """A seed of 1.9 must not silently warm the object of seed 1."""
    body = {"specs": [{"text": "A seeded line.", "seed": 1.9}]}
    async with bare.client.post("/admin/prefetch", headers=AUTH, json=body) as resp:
        status, answer = resp.status, await resp.json()
    assert (status, answer.get("error")) == (400, "bad_items"), answer
    assert bare.node.prefetcher.jobs == {}


async def test_too_many_items_are_400(bare: Served, admin_token: str) -> None:
    limit = PrefetchSettings().max_specs
    assert limit == 1000
    urls = [f"/v1/speech/{'0' * 64}.wav"] * (limit + 1)  # the count is checked first
    answer = await post_json(bare.client, "/admin/prefetch", 400, headers=AUTH, json={"urls": urls})
    assert answer["error"] == "too_many_items"
    specs = [{"text": f"line {n}"} for n in range(limit + 1)]
    answer = await post_json(
        bare.client, "/admin/prefetch", 400, headers=AUTH, json={"specs": specs}
    )
    assert answer["error"] == "too_many_items"
    assert bare.node.prefetcher.jobs == {}


async def test_unknown_job_is_404(bare: Served, admin_token: str) -> None:
    answer = await get_json(bare.client, "/admin/prefetch/0123456789abcdef", 404, headers=AUTH)
    assert answer["error"] == "unknown_job"


async def test_prefetch_without_a_token_is_401_and_starts_nothing(
    bare: Served, admin_token: str
) -> None:
    body = {"urls": [player_url(heart())]}
    async with bare.client.post("/admin/prefetch", json=body) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert bare.node.prefetcher.jobs == {}


async def test_prefetch_with_a_wrong_token_is_401(bare: Served, admin_token: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}x"}
    body = {"urls": [player_url(heart())]}
    async with bare.client.post("/admin/prefetch", json=body, headers=headers) as resp:
        assert resp.status == 401
    assert bare.node.prefetcher.jobs == {}


async def test_prefetch_progress_without_a_token_is_401(bare: Served, admin_token: str) -> None:
    spec = heart()
    put_object(bare.app, spec, payload(100))
    job = await start_job(bare.client, {"urls": [player_url(spec)]})
    async with bare.client.get(f"/admin/prefetch/{job['id']}") as resp:
        assert resp.status == 401
    await finished(bare.client, job["id"])


async def test_prefetch_without_an_admin_token_configured_is_403(
    bare: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    body = {"urls": [player_url(heart())]}
    answer = await post_json(bare.client, "/admin/prefetch", 403, headers=AUTH, json=body)
    assert answer["error"] == "admin_disabled"


# -- cascading purge: edge A in front of shield B ------------------------------------------


@dataclass
class Tiers:
    a: Served
    b: Served
    b_base: str


def closed_port_base() -> str:
    """A loopback base URL nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def tiers(aiohttp_client: AiohttpClient, tmp_path: Path, admin_token: str) -> Tiers:
    b_config = make_config(
        tmp_path / "b", role=Role.SHIELD, synth=SynthSettings(enabled=False, workers=1)
    )
    b_app = create_app(b_config, KEYRING, engines=[])
    b_client = await aiohttp_client(b_app)
    b_base = str(b_client.make_url("")).rstrip("/")
    a_app = create_app(make_config(tmp_path / "a", upstreams=(b_base,)), KEYRING, engines=[])
    a_client = await aiohttp_client(a_app)
    return Tiers(Served(a_app, a_client), Served(b_app, b_client), b_base)


async def purge(client: Client, body: Any) -> Any:
    return await post_json(client, "/admin/purge", 200, headers=AUTH, json=body)


async def test_cascading_purge_removes_the_object_on_both_tiers(tiers: Tiers) -> None:
    spec = heart()
    put_object(tiers.a.app, spec, payload(3000))
    put_object(tiers.b.app, spec, payload(3000))
    await purge(tiers.a.client, {"keys": [spec.key], "cascade": True})
    assert not tiers.a.node.store.contains(spec.key)
    assert not tiers.b.node.store.contains(spec.key)


async def test_cascading_purge_reports_the_upstreams_answer(tiers: Tiers) -> None:
    spec = heart()
    put_object(tiers.a.app, spec, payload(3000))
    put_object(tiers.b.app, spec, payload(3000))
    answer = await purge(tiers.a.client, {"keys": [spec.key], "cascade": True})
    assert answer["purged"] == [spec.key]
    assert answer["missing"] == []
    assert answer["cascade"] == {tiers.b_base: {"status": 200, "keys": 1}}


async def test_cascading_purge_reaches_the_upstream_when_the_edge_lacks_the_object(
    tiers: Tiers,
) -> None:
    spec = heart()
    put_object(tiers.b.app, spec, payload(3000))
    answer = await purge(tiers.a.client, {"keys": [spec.key], "cascade": True})
    assert answer["missing"] == [spec.key]
    assert answer["cascade"] == {tiers.b_base: {"status": 200, "keys": 1}}
    assert not tiers.b.node.store.contains(spec.key)


async def test_cascaded_purge_drops_the_upstreams_hot_copy(tiers: Tiers) -> None:
    spec = heart()
    put_object(tiers.b.app, spec, payload(3000))
    async with tiers.b.client.get(sign(KEYRING, spec)) as resp:  # B now holds it in memory
        assert resp.status == 200
    await purge(tiers.a.client, {"keys": [spec.key], "cascade": True})
    assert tiers.b.node.hot.get(spec.key, time.time()) is None
    async with tiers.b.client.get(sign(KEYRING, spec)) as resp:
        assert resp.status != 200  # B cannot refill it: no engine, no upstream


async def test_cascade_goes_on_from_the_shield_to_its_origin(
    aiohttp_client: AiohttpClient, tmp_path: Path, admin_token: str
) -> None:
    """edge A -> shield B -> origin C: one purge at A removes the object on all three."""
    apps: list[web.Application] = []
    upstreams: tuple[str, ...] = ()
    for name, role in (("c", Role.ORIGIN), ("b", Role.SHIELD), ("a", Role.EDGE)):
        config = make_config(tmp_path / name, role=role, upstreams=upstreams)
        app = create_app(config, KEYRING, engines=[])
        client = await aiohttp_client(app)
        upstreams = (str(client.make_url("")).rstrip("/"),)
        apps.append(app)
        a_client = client
    spec = heart()
    for app in apps:
        put_object(app, spec, payload(3000))
    await purge(a_client, {"keys": [spec.key], "cascade": True})
    assert [node_of(app).store.contains(spec.key) for app in apps] == [False, False, False]


async def test_purge_without_cascade_keeps_the_upstream_copy(tiers: Tiers) -> None:
    spec = heart()
    put_object(tiers.a.app, spec, payload(3000))
    put_object(tiers.b.app, spec, payload(3000))
    answer = await purge(tiers.a.client, {"keys": [spec.key]})
    assert answer == {"purged": [spec.key], "missing": []}
    assert not tiers.a.node.store.contains(spec.key)
    assert tiers.b.node.store.contains(spec.key)


async def test_purge_with_cascade_false_keeps_the_upstream_copy(tiers: Tiers) -> None:
    spec = heart()
    put_object(tiers.b.app, spec, payload(3000))
    answer = await purge(tiers.a.client, {"keys": [spec.key], "cascade": False})
    assert "cascade" not in answer
    assert tiers.b.node.store.contains(spec.key)


async def test_cascade_that_is_not_a_boolean_is_400(tiers: Tiers) -> None:
    spec = heart()
    put_object(tiers.a.app, spec, payload(3000))
    headers = AUTH
    body = {"keys": [spec.key], "cascade": "yes"}
    answer = await post_json(tiers.a.client, "/admin/purge", 400, headers=headers, json=body)
    assert answer["error"] == "bad_cascade"
    assert tiers.a.node.store.contains(spec.key)


async def test_cascade_to_a_dead_upstream_still_purges_here_and_reports_the_error(
    aiohttp_client: AiohttpClient, tmp_path: Path, admin_token: str
) -> None:
    dead = closed_port_base()
    app = create_app(make_config(tmp_path, upstreams=(dead,)), KEYRING, engines=[])
    client = await aiohttp_client(app)
    spec = heart()
    put_object(app, spec, payload(3000))
    answer = await purge(client, {"keys": [spec.key], "cascade": True})
    assert answer["purged"] == [spec.key]
    assert set(answer["cascade"]) == {dead}
    assert answer["cascade"][dead]["keys"] == 1
    assert "error" in answer["cascade"][dead]
    assert not node_of(app).store.contains(spec.key)


# -- the origin's persistent store under purge ----------------------------------------------


@dataclass
class WithOrigin:
    edge: Served
    origin: Served
    persistent: FilesystemStore


@pytest.fixture
async def with_origin(
    aiohttp_client: AiohttpClient, tmp_path: Path, admin_token: str
) -> WithOrigin:
    """Edge A in front of an origin with a filesystem persistent store; neither renders, so
    an object the origin serves can only come from one of its stores."""
    persistent = FilesystemStore(tmp_path / "objects")
    origin_app = create_origin_app(
        make_config(tmp_path / "origin", role=Role.ORIGIN),
        KEYRING,
        engines=[],
        persistent=persistent,
    )
    origin_client = await aiohttp_client(origin_app)
    base = str(origin_client.make_url("")).rstrip("/")
    edge_app = create_app(make_config(tmp_path / "edge", upstreams=(base,)), KEYRING, engines=[])
    edge_client = await aiohttp_client(edge_app)
    return WithOrigin(Served(edge_app, edge_client), Served(origin_app, origin_client), persistent)


def put_everywhere(tiers: WithOrigin, spec: Spec, body: bytes) -> None:
    """The object as a render leaves it: in both disk caches and the persistent store."""
    put_object(tiers.edge.app, spec, body)
    meta = put_object(tiers.origin.app, spec, body)
    tiers.persistent.put(meta, body)


async def test_origin_serves_from_its_persistent_store_without_rendering(
    with_origin: WithOrigin,
) -> None:
    """The set-up's premise: the origin reads its persistent store before rendering."""
    spec = heart()
    body = payload(3000)
    put_everywhere(with_origin, spec, body)
    origin = with_origin.origin.node
    origin.store.delete(spec.key)  # the disk cache only, as a wiped cache disk would
    origin.hot.drop(spec.key)
    async with with_origin.origin.client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        assert await resp.read() == body


async def test_purge_at_the_origin_removes_its_persistent_copy(with_origin: WithOrigin) -> None:
    """An origin's persistent store is a tier of that node: a purge must empty it too, or
    the origin refills every tier below it with the purged object."""
    spec = heart()
    put_everywhere(with_origin, spec, payload(3000))
    await purge(with_origin.origin.client, {"keys": [spec.key]})
    assert not with_origin.origin.node.store.contains(spec.key)
    survived = with_origin.persistent.head(spec.key) is not None
    assert not survived, "the origin's persistent store still holds the purged object"


async def test_purged_object_is_not_served_again_after_a_cascading_purge(
    with_origin: WithOrigin,
) -> None:
    spec = heart()
    put_everywhere(with_origin, spec, payload(3000))
    answer = await purge(with_origin.edge.client, {"keys": [spec.key], "cascade": True})
    assert answer["purged"] == [spec.key]
    async with with_origin.edge.client.get(sign(KEYRING, spec)) as resp:
        status = resp.status
    assert status != 200, "the edge refilled the purged object from the origin"


# -- prefetch pushes from the origin ---------------------------------------------------------


@pytest.mark.slow
async def test_origin_pushes_each_hot_render_to_its_edges(
    aiohttp_client: AiohttpClient, tmp_path: Path, admin_token: str
) -> None:
    """The origin renders a hot object and tells its edge to prefetch it; the edge fetches
    it from the origin, so its first player gets a hit."""
    edge_port = unused_port()
    origin_config = make_config(
        tmp_path / "origin",
        role=Role.ORIGIN,
        origin=OriginSettings(push_edges=(f"http://127.0.0.1:{edge_port}",)),
    )
    origin_app = create_origin_app(
        origin_config, KEYRING, engines=[HibariEngine(("heart",), threads=1)], persistent=None
    )
    origin_client = await aiohttp_client(origin_app)
    await wait_ready(origin_client)
    base = str(origin_client.make_url("")).rstrip("/")
    edge_app = create_app(make_config(tmp_path / "edge", upstreams=(base,)), KEYRING, engines=[])
    edge_client = await aiohttp_client(TestServer(edge_app, port=edge_port))

    spec = heart("Rendered at the origin, pushed to the edge.")
    async with origin_client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        body = await resp.read()
    await eventually(lambda: node_of(edge_app).store.contains(spec.key), JOB_TIMEOUT)
    async with edge_client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        assert await resp.read() == body
    text = await scrape(edge_client)
    assert metric_from(text, "nearvoice_requests_total", result="hit") == 1
    assert metric_from(text, "nearvoice_requests_total", result="miss") == 0


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
