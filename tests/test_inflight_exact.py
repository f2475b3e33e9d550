"""Objects of announced length, answered exactly while they render
(docs/contracts.md#exact-length-from-the-first-byte).

The real hibari engine computes each utterance's sample count with its duration pass before
any audio, so the node knows the object's byte length before its first byte. Renders are
held after their first chunk (tests.test_inflight's HeldEngine), and every answer below is
given while the rest of the object provably does not exist yet: it must be the answer a
stored object would get, with its bytes sent as they are produced.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.meta import etag_for
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.upstream import CHECKSUM_HEADER
from tests.support import (
    MiscountingEngine,
    eventually,
    make_config,
    make_keyring,
    make_spec,
    metric,
    sign,
    value_files,
    wait_ready,
)
from tests.test_inflight import Edge, fetch, shared_edge  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

KEYRING = make_keyring()
TEXT = (
    "The first words of this line come out at once, before the rest is rendered. "
    "Then a second sentence follows. And a third one ends it."
)
_CASES = itertools.count(1)


@pytest_asyncio.fixture(loop_scope="module")
async def edge(shared_edge: Edge) -> AsyncIterator[Edge]:  # noqa: F811 (the fixture)
    """Renders pause after their first chunk; lengths are announced."""
    shared_edge.engine.sized = True
    shared_edge.engine.hold(at=1)
    yield shared_edge
    shared_edge.engine.release()
    await eventually(lambda: not shared_edge.rendering())


def fresh(fmt: AudioFormat = AudioFormat.WAV) -> Spec:
    return make_spec(f"{TEXT} Case {next(_CASES)}.", fmt=fmt)


def url_of(spec: Spec) -> str:
    return sign(KEYRING, spec)


async def held(edge: Edge, spec: Spec) -> int:
    """Starts `spec`'s render (a HEAD is enough), waits until it is held with its first
    chunk produced, and returns the announced length."""
    status, headers, _ = await fetch(edge.client, url_of(spec), "HEAD")
    assert status == 200
    fill = await edge.wait_held(spec, readers=0)
    assert fill.length is not None
    assert int(headers["Content-Length"]) == fill.length
    return fill.length


async def whole(edge: Edge, spec: Spec) -> bytes:
    edge.engine.release()
    fill = edge.fill(spec)
    if fill is not None:
        await fill.until_done()
    _, _, body = await fetch(edge.client, url_of(spec))
    return body


@pytest.mark.parametrize("fmt", [AudioFormat.WAV, AudioFormat.PCM])
async def test_open_range_from_zero_is_an_exact_206_from_the_first_chunk(
    edge: Edge, fmt: AudioFormat
) -> None:
    spec = fresh(fmt)
    async with edge.client.get(url_of(spec), headers={"Range": "bytes=0-"}) as resp:
        first = await resp.content.readany()
        fill = edge.fill(spec)
        assert first and fill is not None and fill.is_running()  # the rest is not rendered
        length = fill.length
        assert length is not None
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 0-{length - 1}/{length}"
        assert resp.headers["Content-Length"] == str(length)
        assert resp.headers["ETag"] == etag_for(spec.key)
        assert CHECKSUM_HEADER not in resp.headers  # the digest needs the whole object
        edge.engine.release()
        streamed = first + await resp.read()
    assert streamed == await whole(edge, spec)
    assert len(streamed) == length


@pytest.mark.parametrize("fmt", [AudioFormat.MP3, AudioFormat.OPUS], ids=str)
async def test_a_tail_probed_object_opened_from_zero_streams_as_a_200_with_exact_ranges(
    edge: Edge, fmt: AudioFormat
) -> None:
    # A player that knows an MP3's size reads its last 128 bytes before it plays (ffmpeg's
    # ID3v1 probe), and of an Ogg stream its last page (its duration); those exist only at
    # the end: `bytes=0-` gets no size (edge.http.stream).
    spec = fresh(fmt)
    async with edge.client.get(url_of(spec), headers={"Range": "bytes=0-"}) as resp:
        first = await resp.content.readany()
        fill = edge.fill(spec)
        assert first and fill is not None and fill.is_running()
        length = fill.length
        assert length is not None
        assert resp.status == 200
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert "Content-Length" not in resp.headers
        status, headers, part = await fetch(
            edge.client, url_of(spec), headers={"Range": "bytes=100-199"}
        )
        assert status == 206
        assert headers["Content-Range"] == f"bytes 100-199/{length}"
        edge.engine.release()
        streamed = first + await resp.read()
    complete = await whole(edge, spec)
    assert streamed == complete and len(complete) == length
    assert part == complete[100:200]


@pytest.mark.parametrize("fmt", [AudioFormat.WAV, AudioFormat.MP3, AudioFormat.OPUS], ids=str)
async def test_head_in_flight_states_the_exact_length(edge: Edge, fmt: AudioFormat) -> None:
    spec = fresh(fmt)
    length = await held(edge, spec)
    status, headers, body = await fetch(edge.client, url_of(spec), "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(length)
    assert headers["Accept-Ranges"] == "bytes"
    assert len(await whole(edge, spec)) == length


@pytest.mark.parametrize("fmt", [AudioFormat.WAV, AudioFormat.OPUS], ids=str)
async def test_a_range_inside_what_exists_is_answered_at_once(edge: Edge, fmt: AudioFormat) -> None:
    spec = fresh(fmt)
    length = await held(edge, spec)
    status, headers, part = await fetch(edge.client, url_of(spec), headers={"Range": "bytes=0-99"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 0-99/{length}"
    assert (await whole(edge, spec))[:100] == part


async def test_a_range_past_what_exists_waits_only_for_its_bytes(edge: Edge) -> None:
    spec = fresh()
    length = await held(edge, spec)
    task = asyncio.create_task(
        fetch(edge.client, url_of(spec), headers={"Range": f"bytes={length - 100}-"})
    )
    await eventually(lambda: edge.readers(spec) == 1)
    assert not task.done()  # those bytes are not rendered yet
    edge.engine.release()
    status, headers, part = await task
    assert status == 206
    assert headers["Content-Range"] == f"bytes {length - 100}-{length - 1}/{length}"
    assert part == (await whole(edge, spec))[-100:]


async def test_several_ranges_in_flight_are_an_exact_multipart(edge: Edge) -> None:
    spec = fresh()
    length = await held(edge, spec)
    task = asyncio.create_task(fetch(edge.client, url_of(spec), headers={"Range": "bytes=0-9,-10"}))
    edge.engine.release()
    status, headers, body = await task
    complete = await whole(edge, spec)
    assert status == 206
    assert headers["Content-Type"].startswith("multipart/byteranges")
    assert int(headers["Content-Length"]) == len(body)
    assert complete[:10] in body and complete[-10:] in body
    assert f"bytes 0-9/{length}".encode() in body


async def test_a_range_past_the_end_is_416_at_once(edge: Edge) -> None:
    spec = fresh()
    length = await held(edge, spec)
    status, headers, _ = await fetch(
        edge.client, url_of(spec), headers={"Range": f"bytes={length}-"}
    )
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{length}"
    edge.engine.release()


async def test_conditionals_in_flight_use_the_etag(edge: Edge) -> None:
    spec = fresh()
    length = await held(edge, spec)
    etag = etag_for(spec.key)
    status, _, _ = await fetch(edge.client, url_of(spec), headers={"If-None-Match": etag})
    assert status == 304
    stale = {"Range": "bytes=0-9", "If-Range": '"another"'}
    matching = {"Range": "bytes=0-9", "If-Range": etag}
    partial = asyncio.create_task(fetch(edge.client, url_of(spec), headers=matching))
    full = asyncio.create_task(fetch(edge.client, url_of(spec), headers=stale))
    status, headers, part = await partial
    assert headers["Content-Range"] == f"bytes 0-9/{length}"
    assert status == 206 and len(part) == 10
    edge.engine.release()
    status, _, body = await full
    assert status == 200 and len(body) == length


async def test_a_render_that_disagrees_with_its_length_is_aborted_and_never_stored(
    tmp_path: Any,
) -> None:
    app = create_app(
        make_config(tmp_path), KEYRING, engines=[MiscountingEngine(HibariEngine(threads=1), 2400)]
    )
    async with TestClient(TestServer(app)) as client:
        await wait_ready(client)
        spec = make_spec(f"{TEXT} Lying.")
        async with client.get(url_of(spec)) as resp:
            assert resp.status == 200
            announced = int(resp.headers["Content-Length"])
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # never padded to the promise, never cut and called whole
        assert await metric(client, "nearvoice_length_mismatches_total", engine="hibari") == 1
        assert value_files(app) == []
        # From now on this voice's lengths are unknown: the next render streams without one.
        async with client.get(url_of(spec)) as resp:
            assert resp.status == 200
            assert "Content-Length" not in resp.headers
            body = await resp.read()
        assert len(body) < announced


async def test_an_edge_relaying_an_upstream_fill_answers_exact_ranges(
    edge: Edge, tmp_path: Any
) -> None:
    """The upstream states the length in its first headers (Content-Length on its 200),
    so an edge relaying the fill answers `bytes=0-` exactly while both still stream."""
    upstream = str(edge.client.make_url("")).rstrip("/")
    config = make_config(tmp_path, upstreams=(upstream,))
    relay_app = create_app(config, KEYRING, engines=[])  # renders nothing itself
    async with TestClient(TestServer(relay_app)) as relay:
        await wait_ready(relay)
        spec = fresh()
        async with relay.get(url_of(spec), headers={"Range": "bytes=0-"}) as resp:
            first = await resp.content.readany()
            fill = edge.fill(spec)  # the upstream's render, still held
            assert first and fill is not None and fill.is_running()
            length = fill.length
            assert length is not None
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 0-{length - 1}/{length}"
            assert resp.headers["ETag"] == etag_for(spec.key)
            edge.engine.release()
            streamed = first + await resp.read()
        assert streamed == await whole(edge, spec)
