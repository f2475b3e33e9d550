"""Misses answered while they render, through the app with the real hibari engine:
request collapsing (one render for many concurrent requests), read-while-write, Range and
conditional requests into an object still being produced, clients that hang up, drafts.

Most tests render through `HeldEngine`: the real HibariEngine, paused before a chosen
sentence until the test releases it. Nothing about the render is faked; the pause only
lets a test make its requests while the object is provably in flight, instead of racing a
render that takes a few milliseconds per sentence.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.fill import Fill
from nearvoice.edge.cache.meta import etag_for
from nearvoice.edge.node import Node
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from tests.support import (
    WrappedEngine,
    eventually,
    make_config,
    make_keyring,
    make_spec,
    metric_from,
    node_of,
    scrape,
    sign,
    wait_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

Client = TestClient[Any, Any]
KEYRING = make_keyring()
HOLD_LIMIT = 30.0  # seconds a held render waits before going on by itself (no hung test)
TEXT = "The edge renders this line. Then it streams the rest. And it stores the object."
LONG_TEXT = " ".join(f"This is sentence number {n} of a long announcement." for n in range(1, 21))
CONCURRENT = 64


class HeldEngine(WrappedEngine):
    """A real engine whose renders pause before sentence `hold_at` until `release()`.

    The audio is the inner engine's, unchanged; `holding` is set once a render has reached
    the pause (every sentence before it has been yielded)."""

    def __init__(self, inner: Engine, hold_at: int | None = 1) -> None:
        super().__init__(inner)
        self.hold_at = hold_at
        self.sized = True
        """Whether the duration pass answers (False: lengths unknown, as external engines)."""
        self.holding = threading.Event()
        self._released = threading.Event()

    def hold(self, at: int) -> None:
        """Pauses the next renders before sentence `at` (0: before any byte exists)."""
        self.hold_at = at
        self.holding.clear()
        self._released.clear()

    def release(self) -> None:
        """Lets paused renders, and all later ones, run to the end."""
        self._released.set()

    def run_freely(self) -> None:
        self.hold_at = None
        self.release()

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        return self._inner.samples(text, voice, speed) if self.sized else None

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        for index, audio in enumerate(self._inner.stream(text, voice, speed, seed)):
            if index == self.hold_at:
                self.holding.set()
                self._released.wait(HOLD_LIMIT)
            yield audio


@dataclass
class Edge:
    app: web.Application
    client: Client
    engine: HeldEngine

    @property
    def node(self) -> Node:
        return node_of(self.app)

    def fill(self, spec: Spec, *, draft: bool = False) -> Fill | None:
        return self.node._fills.get(f"draft:{spec.key}" if draft else spec.key)

    def readers(self, spec: Spec, *, draft: bool = False) -> int:
        fill = self.fill(spec, draft=draft)
        return fill.readers if fill is not None else 0

    def rendering(self) -> bool:
        return any(fill.is_running() for fill in self.node._fills.values())

    async def wait_held(self, spec: Spec, *, readers: int = 1) -> Fill:
        """Waits until the render of `spec` is paused with its first bytes produced and
        `readers` requests attached to it; returns its fill, still running."""
        await eventually(self.engine.holding.is_set)
        await eventually(lambda: (f := self.fill(spec)) is not None and f.size > 0)
        await eventually(lambda: self.readers(spec) == readers)
        fill = self.fill(spec)
        assert fill is not None and fill.is_running()
        return fill


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    """One edge for the module (a model load per test would dominate the run time). Every
    test renders its own key and reads metrics as differences, so tests do not couple."""
    engine = HeldEngine(HibariEngine(threads=1))
    app = create_app(make_config(tmp_path_factory.mktemp("inflight")), KEYRING, engines=[engine])
    async with TestClient(TestServer(app)) as client:
        await wait_ready(client)
        yield Edge(app, client, engine)
        engine.release()


@pytest_asyncio.fixture(loop_scope="module")
async def edge(shared_edge: Edge) -> AsyncIterator[Edge]:
    """The shared edge, its renders pausing after their first sentence, with lengths
    unknown (an engine without a duration pass); tests/test_inflight_exact.py covers
    objects whose length is announced."""
    shared_edge.engine.hold(at=1)
    shared_edge.engine.sized = False
    yield shared_edge
    shared_edge.engine.release()  # never leave a render waiting for a test that is over
    await eventually(lambda: not shared_edge.rendering())


@pytest_asyncio.fixture(loop_scope="module")
async def edge_held_at_start(edge: Edge) -> Edge:
    """The shared edge, its renders pausing before their first sentence (no byte yet)."""
    edge.engine.hold(at=0)
    return edge


@pytest.fixture
def spec() -> Spec:
    """A key no other test of the module renders (its text ends with a fresh number)."""
    return make_spec(f"{TEXT} Case {next(_CASES)}.")


_CASES = itertools.count(1)


async def fetch(
    client: Client, url: str, method: str = "GET", **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.request(method, url, **kwargs) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


class Metrics:
    """The node's metrics as differences from when this was made."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.before = ""
        self.after = ""

    @classmethod
    async def snapshot(cls, client: Client) -> Metrics:
        metrics = cls(client)
        metrics.before = await scrape(client)
        return metrics

    async def read(self) -> Metrics:
        self.after = await scrape(self.client)
        return self

    def delta(self, sample: str, **labels: str) -> float:
        return metric_from(self.after, sample, **labels) - metric_from(
            self.before, sample, **labels
        )

    def now(self, sample: str, **labels: str) -> float:
        return metric_from(self.after, sample, **labels)


def url_of(spec: Spec, policy: Policy = Policy.HOT) -> str:
    return sign(KEYRING, spec, policy=policy)


# -- request collapsing --------------------------------------------------------------------


async def start_concurrent(edge: Edge, url: str, count: int) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(fetch(edge.client, url)) for _ in range(count)]


async def test_concurrent_misses_for_one_key_render_once(
    edge_held_at_start: Edge, spec: Spec
) -> None:
    edge = edge_held_at_start
    metrics = await Metrics.snapshot(edge.client)
    tasks = await start_concurrent(edge, url_of(spec), CONCURRENT)
    await eventually(edge.engine.holding.is_set)
    await eventually(lambda: edge.readers(spec) == CONCURRENT)
    edge.engine.release()
    results = await asyncio.gather(*tasks)

    assert {status for status, _, _ in results} == {200}
    await metrics.read()
    assert metrics.delta("nearvoice_synth_total", engine="hibari") == 1


async def test_collapsed_requests_get_identical_bodies(
    edge_held_at_start: Edge, spec: Spec
) -> None:
    edge = edge_held_at_start
    tasks = await start_concurrent(edge, url_of(spec), CONCURRENT)
    await eventually(lambda: edge.readers(spec) == CONCURRENT)
    edge.engine.release()
    bodies = [body for _, _, body in await asyncio.gather(*tasks)]

    _, _, stored = await fetch(edge.client, url_of(spec))  # now a hit
    assert len(stored) > 44
    assert all(body == stored for body in bodies)


async def test_concurrent_misses_count_one_miss_and_the_rest_collapsed(
    edge_held_at_start: Edge, spec: Spec
) -> None:
    edge = edge_held_at_start
    metrics = await Metrics.snapshot(edge.client)
    tasks = await start_concurrent(edge, url_of(spec), CONCURRENT)
    await eventually(lambda: edge.readers(spec) == CONCURRENT)
    edge.engine.release()
    await asyncio.gather(*tasks)

    await metrics.read()
    assert metrics.delta("nearvoice_requests_total", result="miss") == 1
    assert metrics.delta("nearvoice_requests_total", result="collapsed") == CONCURRENT - 1
    assert metrics.delta("nearvoice_requests_total", result="hit") == 0


# -- read-while-write ----------------------------------------------------------------------


async def test_first_bytes_reach_the_client_while_the_render_is_paused(
    edge: Edge, spec: Spec
) -> None:
    async with edge.client.get(url_of(spec)) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        assert first
        fill = edge.fill(spec)
        assert fill is not None and fill.is_running()
        assert not edge.node.store.contains(spec.key)
        edge.engine.release()
        rest = await resp.read()

    await eventually(lambda: edge.node.store.contains(spec.key))
    _, _, stored = await fetch(edge.client, url_of(spec))
    assert first + rest == stored
    assert len(stored) > len(first)


async def test_long_render_streams_its_first_bytes_before_it_finishes(edge: Edge) -> None:
    # No pause: the real engine renders the sentences one after another, and the first
    # one's bytes must be on the wire while the later ones are still being rendered.
    edge.engine.run_freely()
    spec = make_spec(LONG_TEXT)
    async with edge.client.get(url_of(spec)) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        fill = edge.fill(spec)
        running_at_first_chunk = fill is not None and fill.is_running()
        rest = await resp.read()
    assert first
    assert running_at_first_chunk, "the first bytes arrived only after the render finished"
    _, _, stored = await fetch(edge.client, url_of(spec))
    assert first + rest == stored


# -- Range and conditionals into an in-flight object ---------------------------------------


async def test_bounded_range_in_flight_is_206_with_unknown_length(edge: Edge, spec: Spec) -> None:
    status, headers, part = await fetch(edge.client, url_of(spec), headers={"Range": "bytes=0-99"})
    # Answered while the render is still paused after its first sentence.
    fill = edge.fill(spec)
    assert fill is not None and fill.is_running()
    edge.engine.release()

    assert status == 206
    assert headers["Content-Range"] == "bytes 0-99/*"
    assert headers["Content-Length"] == "100"
    await eventually(lambda: edge.node.store.contains(spec.key))
    _, _, whole = await fetch(edge.client, url_of(spec))
    assert part == whole[:100]


async def test_open_range_from_zero_of_unknown_length_streams_at_once(
    edge: Edge, spec: Spec
) -> None:
    # `bytes=0-` is how players and ffmpeg open a stream. With the length unknown, a 206
    # would need `/*`, which ffmpeg 5.1 reads as a size of 0; waiting would put the render
    # before the first sound. The whole object streams as a 200 instead (RFC 9110 section
    # 14.2 lets a server ignore Range), with Accept-Ranges for the seeks that come later.
    async with edge.client.get(url_of(spec), headers={"Range": "bytes=0-"}) as resp:
        assert resp.status == 200
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert "Content-Length" not in resp.headers
        first = await resp.content.readany()
        fill = edge.fill(spec)
        assert first and fill is not None and fill.is_running()
        edge.engine.release()
        streamed = first + await resp.read()

    _, _, whole = await fetch(edge.client, url_of(spec))
    assert streamed == whole


async def test_open_range_from_an_offset_in_flight_answers_the_exact_tail(
    edge: Edge, spec: Spec
) -> None:
    task = asyncio.create_task(fetch(edge.client, url_of(spec), headers={"Range": "bytes=44-"}))
    await edge.wait_held(spec)
    assert not task.done()
    edge.engine.release()
    status, headers, part = await task

    _, _, whole = await fetch(edge.client, url_of(spec))
    n = len(whole)
    assert status == 206
    assert headers["Content-Range"] == f"bytes 44-{n - 1}/{n}"
    assert part == whole[44:]


async def test_suffix_range_in_flight_waits_and_answers_exactly(edge: Edge, spec: Spec) -> None:
    task = asyncio.create_task(fetch(edge.client, url_of(spec), headers={"Range": "bytes=-100"}))
    await edge.wait_held(spec)
    assert not task.done()
    edge.engine.release()
    status, headers, part = await task

    _, _, whole = await fetch(edge.client, url_of(spec))
    n = len(whole)
    assert status == 206
    assert headers["Content-Range"] == f"bytes {n - 100}-{n - 1}/{n}"
    assert headers["Content-Length"] == "100"
    assert part == whole[-100:]


async def test_head_in_flight_has_the_exact_final_length(edge: Edge, spec: Spec) -> None:
    task = asyncio.create_task(fetch(edge.client, url_of(spec), method="HEAD"))
    await edge.wait_held(spec)
    assert not task.done()
    edge.engine.release()
    status, headers, body = await task

    _, _, whole = await fetch(edge.client, url_of(spec))
    assert status == 200
    assert body == b""
    assert headers["Content-Length"] == str(len(whole))
    assert headers["ETag"] == etag_for(spec.key)


async def test_if_none_match_in_flight_with_the_key_etag_is_304(edge: Edge, spec: Spec) -> None:
    conditional = {"If-None-Match": etag_for(spec.key)}
    task = asyncio.create_task(fetch(edge.client, url_of(spec), headers=conditional))
    await edge.wait_held(spec)
    assert not task.done()
    edge.engine.release()
    status, headers, body = await task

    assert status == 304
    assert body == b""
    assert headers["ETag"] == etag_for(spec.key)


async def test_plain_get_joining_mid_render_gets_the_whole_object(edge: Edge, spec: Spec) -> None:
    metrics = await Metrics.snapshot(edge.client)
    first = asyncio.create_task(fetch(edge.client, url_of(spec)))
    await edge.wait_held(spec)
    second = asyncio.create_task(fetch(edge.client, url_of(spec)))  # joins after bytes exist
    await eventually(lambda: edge.readers(spec) == 2)
    edge.engine.release()
    (_, _, one), (_, _, two) = await asyncio.gather(first, second)

    assert one == two
    await metrics.read()
    assert metrics.delta("nearvoice_requests_total", result="collapsed") == 1


# -- clients that hang up ------------------------------------------------------------------


async def hang_up_after_the_first_bytes(edge: Edge, spec: Spec) -> bytes:
    resp = await edge.client.get(url_of(spec))
    try:
        assert resp.status == 200
        first = await resp.content.readany()
        assert first
    finally:
        resp.close()  # drops the connection mid-body
    return first


async def test_client_hang_up_mid_stream_lets_the_render_finish_and_be_stored(
    edge: Edge, spec: Spec
) -> None:
    await hang_up_after_the_first_bytes(edge, spec)
    assert edge.rendering()
    edge.engine.release()

    await eventually(lambda: edge.node.store.contains(spec.key))


async def test_request_after_a_hang_up_is_a_hit_with_the_full_object(
    edge: Edge, spec: Spec
) -> None:
    metrics = await Metrics.snapshot(edge.client)
    first = await hang_up_after_the_first_bytes(edge, spec)
    edge.engine.release()
    await eventually(lambda: edge.node.store.contains(spec.key))

    status, headers, body = await fetch(edge.client, url_of(spec))
    assert status == 200
    assert headers["Content-Length"] == str(len(body))
    assert body.startswith(first)
    assert len(body) > len(first)
    await metrics.read()
    assert metrics.delta("nearvoice_requests_total", result="hit") == 1
    assert metrics.delta("nearvoice_synth_total", engine="hibari") == 1


# -- drafts --------------------------------------------------------------------------------


async def test_concurrent_drafts_share_one_render(edge_held_at_start: Edge, spec: Spec) -> None:
    edge = edge_held_at_start
    metrics = await Metrics.snapshot(edge.client)
    tasks = await start_concurrent(edge, url_of(spec, Policy.DRAFT), 8)
    await eventually(lambda: edge.readers(spec, draft=True) == len(tasks))
    edge.engine.release()
    results = await asyncio.gather(*tasks)

    assert {status for status, _, _ in results} == {200}
    assert len({body for _, _, body in results}) == 1
    assert {headers["Cache-Control"] for _, headers, _ in results} == {"no-store"}
    await metrics.read()
    assert metrics.delta("nearvoice_synth_total", engine="hibari") == 1
    assert metrics.delta("nearvoice_requests_total", result="bypass") == 1
    assert metrics.delta("nearvoice_requests_total", result="collapsed") == 7


async def test_collapsed_drafts_are_never_stored(edge_held_at_start: Edge, spec: Spec) -> None:
    edge = edge_held_at_start
    tasks = await start_concurrent(edge, url_of(spec, Policy.DRAFT), 8)
    await eventually(lambda: edge.readers(spec, draft=True) == len(tasks))
    edge.engine.release()
    await asyncio.gather(*tasks)

    assert not edge.node.store.contains(spec.key)
    assert edge.node.hot.get(spec.key, time.time()) is None


async def test_draft_request_after_collapsed_drafts_renders_again(
    edge_held_at_start: Edge, spec: Spec
) -> None:
    edge = edge_held_at_start
    tasks = await start_concurrent(edge, url_of(spec, Policy.DRAFT), 4)
    await eventually(lambda: edge.readers(spec, draft=True) == len(tasks))
    edge.engine.release()
    await asyncio.gather(*tasks)
    metrics = await Metrics.snapshot(edge.client)

    status, _, _ = await fetch(edge.client, url_of(spec, Policy.DRAFT))
    assert status == 200
    await metrics.read()
    assert metrics.delta("nearvoice_synth_total", engine="hibari") == 1
    assert metrics.delta("nearvoice_requests_total", result="bypass") == 1


# -- metrics -------------------------------------------------------------------------------


async def test_render_queue_depth_counts_a_paused_render_and_returns_to_zero(
    edge: Edge, spec: Spec
) -> None:
    task = asyncio.create_task(fetch(edge.client, url_of(spec)))
    await edge.wait_held(spec)
    held = await Metrics(edge.client).read()
    assert held.now("nearvoice_render_queue_depth") == 1
    edge.engine.release()
    await task
    await eventually(lambda: not edge.rendering())

    done = await Metrics(edge.client).read()
    assert done.now("nearvoice_render_queue_depth") == 0


async def test_render_metrics_count_seconds_and_audio(edge: Edge, spec: Spec) -> None:
    edge.engine.run_freely()
    metrics = await Metrics.snapshot(edge.client)
    status, _, _ = await fetch(edge.client, url_of(spec))
    assert status == 200

    await metrics.read()
    assert metrics.delta("nearvoice_synth_seconds_count") == 1
    assert metrics.delta("nearvoice_synth_seconds_sum") > 0
    assert metrics.delta("nearvoice_synth_audio_seconds_total") > 1.0  # four sentences
    assert metrics.now("nearvoice_render_queue_depth") == 0


async def test_ttfb_is_observed_for_miss_collapsed_and_hit(edge: Edge, spec: Spec) -> None:
    metrics = await Metrics.snapshot(edge.client)
    miss = asyncio.create_task(fetch(edge.client, url_of(spec)))
    await edge.wait_held(spec)
    collapsed = asyncio.create_task(fetch(edge.client, url_of(spec)))
    await eventually(lambda: edge.readers(spec) == 2)
    edge.engine.release()
    await asyncio.gather(miss, collapsed)
    await eventually(lambda: edge.node.store.contains(spec.key))
    status, _, _ = await fetch(edge.client, url_of(spec))
    assert status == 200

    await metrics.read()
    for result in ("miss", "collapsed", "hit"):
        assert metrics.delta("nearvoice_ttfb_seconds_count", result=result) == 1, result
