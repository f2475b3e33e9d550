"""A real Chromium plays objects still being rendered, and seeks in them once complete.

Browsers open media with `Range: bytes=0-`. With the object's length announced by the
duration pass, the edge answers that `206 bytes 0-(L-1)/L` from the first sentence; with the
length unknown it streams a 200 (edge.http.stream). Either way the player must start while
the render is still going: the render is held after its first chunk (tests.test_inflight's
HeldEngine, the real hibari engine paused), and `playing` must fire before it is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from nearvoice.bench.browser import PLAY, SEEK
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.spec import Spec
from tests.browser import chromium
from tests.support import eventually, make_keyring, make_spec, sign
from tests.test_inflight import Edge, shared_edge  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

KEYRING = make_keyring()
MINUTE = " ".join(
    f"Announcement {n}: the train to the coast leaves from platform {n} in a few minutes."
    for n in range(1, 17)
)


@pytest_asyncio.fixture(loop_scope="module")
async def edge(shared_edge: Edge) -> Edge:  # noqa: F811 (the fixture)
    """tests.test_inflight's edge: the real hibari engine, held where a test says."""
    return shared_edge


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    opened = await browser.new_page()
    yield opened
    await opened.close()


def url_of(edge: Edge, spec: Spec) -> str:
    return str(edge.client.make_url(sign(KEYRING, spec)))


async def stored_seconds(edge: Edge, spec: Spec, rate: int = 24000) -> float:
    """The complete object's duration, from the node's own copy."""
    fill = edge.fill(spec)
    assert fill is not None
    await fill.until_done()
    body = fill.body()
    if spec.format is AudioFormat.WAV:
        return (len(body) - 44) / 2 / rate
    return 0.0


@pytest.mark.parametrize("sized", [True, False], ids=["length-announced", "length-unknown"])
async def test_chromium_plays_a_cold_miss_while_it_renders_and_seeks_once_complete(
    edge: Edge, page: Page, sized: bool
) -> None:
    spec = make_spec(f"{MINUTE} Case {'sized' if sized else 'unsized'}.")
    edge.engine.sized = sized
    edge.engine.hold(at=1)  # the first chunk renders, then the render waits
    try:
        played = asyncio.create_task(page.evaluate(PLAY, url_of(edge, spec)))
        await eventually(edge.engine.holding.is_set)
        outcome: dict[str, Any] = await played
        fill = edge.fill(spec)
        # `playing` came while the rest of the minute was still unrendered.
        assert fill is not None and fill.is_running()
        assert edge.engine.holding.is_set()
        assert outcome["ms"] > 0
    finally:
        edge.engine.release()
    seconds = await stored_seconds(edge, spec)
    assert seconds > 40  # about a minute of speech
    if sized:
        # The WAV header stated the exact length before the render went past its start.
        assert outcome["duration"] == pytest.approx(seconds, abs=0.01)

    # Once complete, the player seeks within the object (a Range request answered 206).
    landed = await page.evaluate(SEEK, seconds - 5.0)
    assert landed["time"] == pytest.approx(seconds - 5.0, abs=0.25)
    if sized:
        assert landed["duration"] == pytest.approx(seconds, abs=0.05)
    # (A stream of unknown length stays "infinite" to the element that opened it; the
    # seek still lands, on an exact 206 of the complete object.)


async def test_chromium_plays_a_cold_mp3_while_it_renders(edge: Edge, page: Page) -> None:
    """MP3 of announced length: opened with `bytes=0-`, it streams without a size, since
    a player that knows an MP3's size reads its last bytes first (edge.http.stream).
    Chromium's demuxer reads about 32 KiB before it plays, a little more than this line's
    first sentence at 48 kbps, so the render is held after its second chunk."""
    spec = make_spec(f"{MINUTE} Case mp3.", fmt=AudioFormat.MP3)
    edge.engine.sized = True
    edge.engine.hold(at=2)
    try:
        played = asyncio.create_task(page.evaluate(PLAY, url_of(edge, spec)))
        await eventually(edge.engine.holding.is_set)
        await played
        fill = edge.fill(spec)
        assert fill is not None and fill.is_running() and fill.length is not None
    finally:
        edge.engine.release()
    await stored_seconds(edge, spec)
    landed = await page.evaluate(SEEK, 30.0)  # an exact 206 of the complete object
    assert landed["time"] == pytest.approx(30.0, abs=0.25)


async def test_chromium_plays_a_cold_opus_while_it_renders(edge: Edge, page: Page) -> None:
    """Ogg Opus of announced length: opened with `bytes=0-`, it streams without a size, since
    a player that knows an Ogg stream's size reads its last page first (edge.http.stream).
    Chromium's demuxer reads about 32 KiB before it plays, 8 s of Opus at 4.2 kB/s, so the
    render is held after its third chunk. Once complete, the element seeks on exact 206s and
    lands where a decoder of the stored object would."""
    spec = make_spec(f"{MINUTE} Case opus.", fmt=AudioFormat.OPUS)
    edge.engine.sized = True
    edge.engine.hold(at=3)
    try:
        played = asyncio.create_task(page.evaluate(PLAY, url_of(edge, spec)))
        await eventually(edge.engine.holding.is_set)
        outcome: dict[str, Any] = await played
        fill = edge.fill(spec)
        assert fill is not None and fill.is_running() and fill.length is not None
        assert outcome["ms"] > 0
    finally:
        edge.engine.release()
    fill = edge.fill(spec)
    assert fill is not None
    await fill.until_done()
    body = fill.body()
    assert len(body) == fill.length
    # The last page's granule, less the pre-skip, is the exact 48 kHz sample count.
    last = body.rindex(b"OggS")
    seconds = (int.from_bytes(body[last + 6 : last + 14], "little") - 312) / 48000
    assert seconds > 40
    landed = await page.evaluate(SEEK, seconds - 5.0)
    assert landed["time"] == pytest.approx(seconds - 5.0, abs=0.25)
