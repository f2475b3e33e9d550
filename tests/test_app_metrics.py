"""GET /metrics carries every contract name of docs/contracts.md#metrics, and the counters move
with the requests that the app answers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.meta import etag_for
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import speech_path
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
    scrape_until,
    sign,
    signed_fields,
    target,
    wait_ready,
)

Client = TestClient[Any, Any]
RESULTS = ("hit", "miss", "stale", "collapsed", "bypass", "rejected", "error")
SOURCES = ("cache", "synth", "upstream")
BODY_LENGTH = 20_000

# (exposed name, Prometheus type) of every metric docs/contracts.md#metrics names.
CONTRACT = [
    ("nearvoice_requests_total", "counter"),
    ("nearvoice_response_bytes_total", "counter"),
    ("nearvoice_ttfb_seconds", "histogram"),
    ("nearvoice_synth_total", "counter"),
    ("nearvoice_synth_seconds", "histogram"),
    ("nearvoice_synth_audio_seconds_total", "counter"),
    ("nearvoice_render_queue_depth", "gauge"),
    ("nearvoice_upstream_requests_total", "counter"),
    ("nearvoice_cache_bytes", "gauge"),
    ("nearvoice_cache_objects", "gauge"),
    ("nearvoice_hot_bytes", "gauge"),
    ("nearvoice_evictions_total", "counter"),
    ("nearvoice_token_rejections_total", "counter"),
]


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring()


@pytest.fixture
async def node(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> tuple[web.Application, Client]:
    app = create_app(make_config(tmp_path), keyring, engines=[])
    return app, await aiohttp_client(app)


@pytest.fixture
def stored(node: Any) -> tuple[Spec, bytes]:
    app, _ = node
    spec = make_spec()
    body = payload(BODY_LENGTH)
    put_object(app, spec, body)
    return spec, body


async def test_healthz_is_200_json(node: Any) -> None:
    _, client = node
    async with client.get("/healthz") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == {"status": "ok"}


async def test_metrics_is_prometheus_text(node: Any) -> None:
    _, client = node
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    assert list(text_string_to_metric_families(text))  # parses


@pytest.mark.parametrize(("name", "kind"), CONTRACT, ids=[name for name, _ in CONTRACT])
async def test_contract_metric_is_exposed(node: Any, name: str, kind: str) -> None:
    _, client = node
    text = await scrape(client)
    assert f"# TYPE {name} {kind}\n" in text


async def test_every_result_label_is_exposed_from_the_start(node: Any) -> None:
    _, client = node
    text = await scrape(client)
    for result in RESULTS:
        assert f'nearvoice_requests_total{{result="{result}"}} 0.0' in text


async def test_every_source_label_is_exposed_from_the_start(node: Any) -> None:
    _, client = node
    text = await scrape(client)
    for source in SOURCES:
        assert f'nearvoice_response_bytes_total{{source="{source}"}} 0.0' in text


async def test_ttfb_is_a_histogram_labelled_by_result(node: Any) -> None:
    _, client = node
    text = await scrape(client)
    for result in RESULTS:
        assert f'nearvoice_ttfb_seconds_bucket{{le="+Inf",result="{result}"}}' in text
        assert f'nearvoice_ttfb_seconds_count{{result="{result}"}}' in text


async def test_a_hit_counts_result_and_cache_bytes(
    node: Any, keyring: Keyring, stored: tuple[Spec, bytes]
) -> None:
    _, client = node
    spec, body = stored
    async with client.get(sign(keyring, spec)) as resp:
        assert await resp.read() == body
    text = await scrape(client)
    assert metric_from(text, "nearvoice_requests_total", result="hit") == 1
    assert metric_from(text, "nearvoice_response_bytes_total", source="cache") == len(body)
    assert metric_from(text, "nearvoice_response_bytes_total", source="synth") == 0
    assert metric_from(text, "nearvoice_ttfb_seconds_count", result="hit") == 1


async def test_a_range_hit_counts_the_range_bytes(
    node: Any, keyring: Keyring, stored: tuple[Spec, bytes]
) -> None:
    _, client = node
    spec, _ = stored
    async with client.get(sign(keyring, spec), headers={"Range": "bytes=0-999"}) as resp:
        assert resp.status == 206
        assert len(await resp.read()) == 1000
    assert await metric(client, "nearvoice_response_bytes_total", source="cache") == 1000


async def test_head_and_304_send_no_body_bytes(
    node: Any, keyring: Keyring, stored: tuple[Spec, bytes]
) -> None:
    _, client = node
    spec, _ = stored
    url = sign(keyring, spec)
    async with client.head(url) as resp:
        assert resp.status == 200
    async with client.get(url, headers={"If-None-Match": etag_for(spec.key)}) as resp:
        assert resp.status == 304
    text = await scrape(client)
    assert metric_from(text, "nearvoice_response_bytes_total", source="cache") == 0
    assert metric_from(text, "nearvoice_requests_total", result="hit") == 2


@pytest.mark.parametrize(
    ("reason", "status"),
    [("bad_signature", 403), ("expired", 410), ("ip_mismatch", 403), ("unknown_parameter", 400)],
)
async def test_a_rejection_counts_its_reason(
    node: Any, keyring: Keyring, stored: tuple[Spec, bytes], reason: str, status: int
) -> None:
    _, client = node
    spec, _ = stored
    fields = signed_fields(keyring, spec)
    url = {
        "bad_signature": target(speech_path(spec), {**fields, "sig": "AAAA"}),
        "expired": sign(keyring, spec, ttl=60, now=time.time() - 3600),
        "ip_mismatch": sign(keyring, spec, ip="10.0.0.0/8"),
        "unknown_parameter": target(speech_path(spec), {**fields, "x": "1"}),
    }[reason]
    async with client.get(url) as resp:
        assert resp.status == status
        assert (await resp.json())["error"] == reason
    text = await scrape(client)
    assert metric_from(text, "nearvoice_token_rejections_total", reason=reason) == 1
    assert metric_from(text, "nearvoice_requests_total", result="rejected") == 1
    assert metric_from(text, "nearvoice_requests_total", result="hit") == 0
    assert metric_from(text, "nearvoice_response_bytes_total", source="cache") == 0


async def test_a_malformed_path_counts_as_rejected(node: Any) -> None:
    _, client = node
    async with client.get("/v1/speech/not-a-key.wav") as resp:
        assert resp.status == 400
    assert await metric(client, "nearvoice_requests_total", result="rejected") == 1


async def test_cache_gauges_follow_the_store(node: Any, stored: tuple[Spec, bytes]) -> None:
    app, client = node
    put_object(app, make_spec("A second line."), payload(BODY_LENGTH, seed=2))
    text = await scrape(client)
    assert metric_from(text, "nearvoice_cache_objects") == 2
    assert metric_from(text, "nearvoice_cache_bytes") >= 2 * BODY_LENGTH
    assert metric_from(text, "nearvoice_evictions_total") == 0


async def test_nothing_renders_on_a_hit(
    node: Any, keyring: Keyring, stored: tuple[Spec, bytes]
) -> None:
    _, client = node
    spec, _ = stored
    async with client.get(sign(keyring, spec)) as resp:
        assert resp.status == 200
        await resp.read()
    text = await scrape(client)
    assert metric_from(text, "nearvoice_synth_total", engine="hibari") == 0
    assert metric_from(text, "nearvoice_render_queue_depth") == 0
    assert metric_from(text, "nearvoice_requests_total", result="miss") == 0


@pytest.mark.slow
async def test_a_miss_counts_synth_bytes_and_render_metrics(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path), keyring))
    await wait_ready(client)
    async with client.get(sign(keyring, make_spec("Counting a miss."))) as resp:
        assert resp.status == 200
        body = await resp.read()
    text = await scrape_until(
        client,
        lambda t: (
            metric_from(t, "nearvoice_synth_seconds_count") == 1
            and metric_from(t, "nearvoice_cache_objects") == 1
        ),
    )
    assert metric_from(text, "nearvoice_requests_total", result="miss") == 1
    assert metric_from(text, "nearvoice_response_bytes_total", source="synth") == len(body)
    assert metric_from(text, "nearvoice_response_bytes_total", source="cache") == 0
    assert metric_from(text, "nearvoice_synth_total", engine="hibari") == 1
    assert metric_from(text, "nearvoice_synth_seconds_count") == 1
    # A 16-bit mono WAV at 24 kHz: 48000 bytes per second after the 44-byte header.
    audio_seconds = metric_from(text, "nearvoice_synth_audio_seconds_total")
    assert audio_seconds == pytest.approx((len(body) - 44) / 48000, abs=1e-3)
    assert metric_from(text, "nearvoice_render_queue_depth") == 0
    assert metric_from(text, "nearvoice_cache_objects") == 1


async def test_the_hot_tier_gauge_is_the_memory_it_holds(
    node: Any, keyring: Keyring, stored: tuple[Spec, bytes]
) -> None:
    app, client = node
    assert metric_from(await scrape(client), "nearvoice_hot_bytes") == 0
    spec, body = stored
    for _ in range(3):  # hits bring the object into memory
        async with client.get(sign(keyring, spec)) as resp:
            assert await resp.read() == body
    held = node_of(app).hot.memory
    assert held >= len(body)
    assert metric_from(await scrape(client), "nearvoice_hot_bytes") == held
