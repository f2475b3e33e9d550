"""Unit tests of the in-flight `Fill` (edge.cache.fill): one object being produced, read by
any number of readers while it is written. Pure asyncio, no server."""

from __future__ import annotations

import asyncio
import time

import pytest

from nearvoice.edge.cache.fill import Fill, FillFailed, FillState
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.policy import Policy

KEY = "ab" * 32
CONTENT_TYPE = "audio/wav"
WAIT = 5.0  # seconds before a test that waits on a fill gives up


def meta_for(body: bytes) -> ObjectMeta:
    return ObjectMeta(
        key=KEY,
        content_type=CONTENT_TYPE,
        length=len(body),
        etag=etag_for(KEY),
        sha256="0" * 64,
        policy=Policy.HOT,
        stored_at=time.time(),
        ttl=3600,
    )


def started_fill() -> Fill:
    fill = Fill(KEY)
    fill.start(CONTENT_TYPE, etag_for(KEY))
    return fill


async def collect(fill: Fill, start: int = 0, end: int | None = None) -> bytes:
    async with asyncio.timeout(WAIT):
        return b"".join([piece async for piece in fill.read(start, end)])


async def settle() -> None:
    """Lets every task that is ready run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def produce(fill: Fill, chunks: list[bytes]) -> None:
    """Appends `chunks` one at a time, yielding to readers in between, then finishes."""
    for chunk in chunks:
        fill.append(chunk)
        await settle()
    fill.finish(meta_for(b"".join(chunks)))


CHUNKS = [b"RIFF", b"0123456789", b"abcdef", b"", b"XYZ"]
WHOLE = b"".join(CHUNKS)


async def test_reader_gets_appended_chunks_in_order() -> None:
    fill = started_fill()
    reader = asyncio.create_task(collect(fill))
    await settle()
    await produce(fill, CHUNKS)
    assert await reader == WHOLE


async def test_reader_sees_each_chunk_before_the_fill_ends() -> None:
    fill = started_fill()
    seen: list[bytes] = []

    async def read() -> None:
        async for piece in fill.read(0, None):
            seen.append(piece)

    reader = asyncio.create_task(read())
    fill.append(b"first")
    await settle()
    assert seen == [b"first"]
    assert fill.is_running()
    fill.append(b"second")
    await settle()
    assert seen == [b"first", b"second"]
    fill.finish(meta_for(b"firstsecond"))
    async with asyncio.timeout(WAIT):
        await reader


async def test_reader_starting_mid_way_gets_everything_from_its_offset() -> None:
    fill = started_fill()
    fill.append(b"0123456789")
    fill.append(b"abcdef")
    late = asyncio.create_task(collect(fill, 7))
    await settle()
    fill.append(b"XYZ")
    fill.finish(meta_for(b"0123456789abcdefXYZ"))
    assert await late == b"789abcdefXYZ"


async def test_reader_joining_after_the_fill_finished_gets_the_whole_object() -> None:
    fill = started_fill()
    await produce(fill, CHUNKS)
    assert await collect(fill) == WHOLE
    assert await collect(fill, 5) == WHOLE[5:]


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 1), (0, 4), (2, 6), (3, 14), (4, 14), (13, 20), (0, len(WHOLE)), (22, len(WHOLE))],
)
async def test_read_yields_exactly_the_bounded_range(start: int, end: int) -> None:
    fill = started_fill()
    reader = asyncio.create_task(collect(fill, start, end))
    await settle()
    await produce(fill, CHUNKS)
    assert await reader == WHOLE[start:end]


async def test_bounded_read_returns_before_the_fill_ends() -> None:
    fill = started_fill()
    fill.append(b"0123456789")
    assert await collect(fill, 2, 5) == b"234"
    assert fill.is_running()


async def test_bounded_read_past_the_end_stops_at_the_end() -> None:
    fill = started_fill()
    reader = asyncio.create_task(collect(fill, 10, 1000))
    await settle()
    await produce(fill, CHUNKS)
    assert await reader == WHOLE[10:]


async def test_read_from_the_end_is_empty() -> None:
    fill = started_fill()
    await produce(fill, CHUNKS)
    assert await collect(fill, len(WHOLE)) == b""


async def test_until_size_waits_for_enough_bytes() -> None:
    fill = started_fill()
    waiter = asyncio.create_task(fill.until_size(8))
    fill.append(b"1234")
    await settle()
    assert not waiter.done()
    fill.append(b"5678")
    await settle()
    assert waiter.done()
    await waiter


async def test_until_size_returns_at_once_when_the_bytes_exist() -> None:
    fill = started_fill()
    fill.append(b"12345678")
    async with asyncio.timeout(WAIT):
        await fill.until_size(8)
        await fill.until_size(1)


async def test_until_size_returns_when_the_fill_ends_short() -> None:
    fill = started_fill()
    waiter = asyncio.create_task(fill.until_size(100))
    fill.append(b"short")
    await settle()
    assert not waiter.done()
    fill.finish(meta_for(b"short"))
    async with asyncio.timeout(WAIT):
        await waiter
    assert fill.size == 5


async def test_until_size_raises_when_the_fill_fails() -> None:
    fill = started_fill()
    waiter = asyncio.create_task(fill.until_size(100))
    fill.append(b"some")
    await settle()
    fill.fail(FillFailed("render_failed", "boom"))
    async with asyncio.timeout(WAIT):
        with pytest.raises(FillFailed):
            await waiter


async def test_until_done_waits_for_finish_and_returns_the_meta() -> None:
    fill = started_fill()
    waiter = asyncio.create_task(fill.until_done())
    fill.append(b"abc")
    await settle()
    assert not waiter.done()
    meta = meta_for(b"abc")
    fill.finish(meta)
    async with asyncio.timeout(WAIT):
        assert await waiter is meta
    assert fill.state is FillState.DONE


async def test_until_done_raises_the_fills_error() -> None:
    fill = started_fill()
    waiter = asyncio.create_task(fill.until_done())
    await settle()
    error = FillFailed("upstream_unavailable", "no upstream", retry_after=5)
    fill.fail(error)
    async with asyncio.timeout(WAIT):
        with pytest.raises(FillFailed) as caught:
            await waiter
    assert caught.value is error
    assert caught.value.code == "upstream_unavailable"
    assert caught.value.retry_after == 5


async def test_until_started_waits_for_the_content_type() -> None:
    fill = Fill(KEY)
    waiter = asyncio.create_task(fill.until_started())
    await settle()
    assert not waiter.done()
    fill.start(CONTENT_TYPE, etag_for(KEY))
    await settle()
    assert waiter.done()
    await waiter
    assert fill.content_type == CONTENT_TYPE


async def test_until_started_raises_when_the_fill_fails_before_starting() -> None:
    fill = Fill(KEY)
    waiter = asyncio.create_task(fill.until_started())
    await settle()
    fill.fail(FillFailed("no_renderer", "nothing renders this voice"))
    async with asyncio.timeout(WAIT):
        with pytest.raises(FillFailed) as caught:
            await waiter
    assert caught.value.code == "no_renderer"


async def test_fail_wakes_every_waiting_reader_with_fill_failed() -> None:
    fill = started_fill()
    fill.append(b"partial")
    readers = [asyncio.create_task(collect(fill, start)) for start in (0, 3, 7, 50)]
    await settle()
    assert not any(r.done() for r in readers)
    fill.fail(FillFailed("render_failed", "engine crashed"))
    results = await asyncio.gather(*readers, return_exceptions=True)
    assert all(isinstance(r, FillFailed) for r in results), results


async def test_reader_of_a_failed_fill_gets_the_bytes_then_the_error() -> None:
    fill = started_fill()
    fill.append(b"partial")
    got: list[bytes] = []

    async def read() -> None:
        async for piece in fill.read(0, None):
            got.append(piece)

    reader = asyncio.create_task(read())
    await settle()
    fill.fail(FillFailed("render_failed", "engine crashed"))
    async with asyncio.timeout(WAIT):
        with pytest.raises(FillFailed):
            await reader
    assert b"".join(got) == b"partial"


async def test_failed_fill_ignores_later_appends_and_finish() -> None:
    fill = started_fill()
    fill.append(b"abc")
    fill.fail(FillFailed("render_failed", "x"))
    fill.append(b"def")
    assert fill.size == 3
    assert fill.state is FillState.FAILED
    fill.fail(FillFailed("other", "y"))
    assert fill.error is not None and fill.error.code == "render_failed"


async def test_append_after_finish_is_ignored() -> None:
    fill = started_fill()
    await produce(fill, CHUNKS)
    fill.append(b"late")
    assert fill.size == len(WHOLE)
    assert await collect(fill) == WHOLE


async def test_empty_appends_are_ignored() -> None:
    fill = started_fill()
    fill.append(b"")
    assert fill.size == 0
    assert fill.first_byte_at is None
    fill.append(b"x")
    assert fill.first_byte_at is not None


async def test_body_joins_the_chunks() -> None:
    fill = started_fill()
    await produce(fill, CHUNKS)
    assert fill.body() == WHOLE
    assert fill.body() == WHOLE  # idempotent


async def test_body_of_an_empty_fill_is_empty() -> None:
    assert started_fill().body() == b""


async def test_readers_still_work_after_body() -> None:
    fill = started_fill()
    await produce(fill, CHUNKS)
    fill.body()
    assert await collect(fill) == WHOLE
    assert await collect(fill, 5) == WHOLE[5:]
    assert await collect(fill, 3, 9) == WHOLE[3:9]


async def test_reader_in_progress_survives_body_and_further_appends() -> None:
    fill = started_fill()
    fill.append(b"0123")
    fill.append(b"4567")
    reader = asyncio.create_task(collect(fill, 2))
    await settle()
    assert fill.body() == b"01234567"
    fill.append(b"89")
    await settle()
    fill.finish(meta_for(b"0123456789"))
    assert await reader == b"23456789"
    assert await collect(fill, 6, 9) == b"678"


async def test_five_hundred_concurrent_readers_get_identical_bytes() -> None:
    fill = started_fill()
    chunks = [bytes([i % 256]) * (100 + i) for i in range(60)]
    readers = [asyncio.create_task(collect(fill)) for _ in range(500)]
    await settle()
    producer = asyncio.create_task(produce(fill, chunks))
    bodies = await asyncio.gather(*readers)
    await producer
    expected = b"".join(chunks)
    assert len(bodies) == 500
    assert all(body == expected for body in bodies)


async def test_readers_joining_at_different_moments_get_identical_bytes() -> None:
    fill = started_fill()
    chunks = [bytes([65 + i % 26]) * 37 for i in range(40)]
    readers: list[asyncio.Task[bytes]] = []
    for chunk in chunks:
        readers.extend(asyncio.create_task(collect(fill)) for _ in range(10))
        fill.append(chunk)
        await settle()
    fill.finish(meta_for(b"".join(chunks)))
    bodies = await asyncio.gather(*readers)
    assert {len(bodies), len(set(bodies))} == {400, 1}
    assert bodies[0] == b"".join(chunks)


async def test_a_length_that_follows_the_first_bytes_is_still_waited_for() -> None:
    fill = started_fill()
    fill.length_follows()
    fill.append(b"first bytes")
    sized = asyncio.ensure_future(fill.until_sized())
    await settle()
    assert not sized.done()  # bytes alone do not make the length unknown now
    fill.set_length(len(b"first bytes") + 3)
    async with asyncio.timeout(WAIT):
        await sized
    assert fill.length == 14


async def test_without_the_promise_bytes_before_the_length_mean_no_length() -> None:
    fill = started_fill()
    fill.append(b"first bytes")
    async with asyncio.timeout(WAIT):
        await fill.until_sized()  # the first byte came unannounced: the length is unknown
    assert fill.length is None
    with pytest.raises(RuntimeError, match="before its first byte"):
        fill.set_length(20)


async def test_the_promise_comes_before_the_first_byte() -> None:
    fill = started_fill()
    fill.append(b"x")
    with pytest.raises(RuntimeError, match="promised before its first byte"):
        fill.length_follows()


async def test_a_fill_that_fails_before_its_promised_length_wakes_its_readers() -> None:
    fill = started_fill()
    fill.length_follows()
    fill.append(b"first")
    sized = asyncio.ensure_future(fill.until_sized())
    await settle()
    fill.fail(FillFailed("render_failed", "the pass broke"))
    with pytest.raises(FillFailed):
        async with asyncio.timeout(WAIT):
            await sized
