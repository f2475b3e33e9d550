"""The speech API for a voice the edge cannot render: two real nodes on loopback.

Edge A renders `heart` only, with B as its upstream; B renders `heart` and `joe` (piper,
22.05 kHz). An API request for `joe` at A becomes a spec, is signed into the URL a player
would use, and that URL is fetched from B exactly as for a player's miss (reason
`no_engine`); the object is then cached on A. `pcm` is 24 kHz whatever the voice: B
resamples, and the spec carries `rate`, so it is another object than joe's own-rate one.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest
import pytest_asyncio

from nearvoice.edge.config import SynthSettings
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import PiperEngine
from tests.api_support import API_SETTINGS, ApiNode, api_node, speak, sse_audio, sse_events
from tests.support import eventually, make_config, metric_from, scrape_until
from tests.test_upstream import QUICK

pytestmark = pytest.mark.slow
in_module_loop = pytest.mark.asyncio(loop_scope="module")
_CASES = itertools.count(1)


@dataclass
class Pair:
    a: ApiNode
    b: ApiNode


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pair]:
    data = tmp_path_factory.mktemp("api-upstream")
    b_config = make_config(data / "b", synth=SynthSettings(workers=1, voices=("heart", "joe")))
    b_engines = [HibariEngine(("heart",), threads=1), PiperEngine(("joe",), threads=1)]
    async with api_node(b_config, b_engines) as b:
        a_config = make_config(data / "a", upstreams=(b.base,), upstream=QUICK, api=API_SETTINGS)
        async with api_node(a_config, [HibariEngine(("heart",), threads=1)]) as a:
            yield Pair(a, b)


def line() -> str:
    return f"Joe reads this through the edge. Case {next(_CASES)}."


def moved(after: str, before: str, sample: str, **labels: str) -> float:
    return metric_from(after, sample, **labels) - metric_from(before, sample, **labels)


@in_module_loop
async def test_an_origin_only_voice_comes_from_upstream_and_is_cached_at_the_edge(
    pair: Pair,
) -> None:
    text = line()
    a_before, b_before = await pair.a.metrics(), await pair.b.metrics()
    first = await speak(pair.a.sdk(), input=text, voice="joe", response_format="wav")
    assert first.status == 200
    assert first.headers["x-nearvoice-cache"] == "miss"
    assert first.headers["content-type"] == "audio/wav"
    assert int.from_bytes(first.body[24:28], "little") == 22050  # the WAV header's rate
    # Bytes are counted, and the object committed, after the body's last byte left.
    bytes_sample = "nearvoice_response_bytes_total"
    a_after = await scrape_until(
        pair.a.client,
        lambda t: moved(t, a_before, bytes_sample, source="upstream") >= len(first.body),
    )
    await eventually(pair.a.idle)
    b_after = await pair.b.metrics()
    upstream = "nearvoice_upstream_requests_total"
    assert moved(a_after, a_before, upstream, reason="no_engine") == 1
    assert moved(b_after, b_before, "nearvoice_synth_total", engine="piper") == 1
    assert moved(a_after, a_before, "nearvoice_response_bytes_total", source="upstream") == len(
        first.body
    )

    again = await speak(pair.a.sdk(), input=text, voice="joe", response_format="wav")
    assert again.headers["x-nearvoice-cache"] == "hit"
    assert again.body == first.body
    assert moved(await pair.a.metrics(), a_after, upstream, reason="no_engine") == 0
    # The object is the one B holds under the URL the answer names.
    async with pair.b.client.get(first.headers["content-location"].split("/", 3)[3]) as resp:
        assert resp.status == 200
        assert await resp.read() == first.body


@in_module_loop
async def test_pcm_of_a_22khz_voice_is_resampled_to_24khz(pair: Pair) -> None:
    text = line()
    sdk = pair.a.sdk()
    wav = await speak(sdk, input=text, voice="joe", response_format="wav")
    pcm = await speak(sdk, input=text, voice="joe", response_format="pcm")
    assert pcm.headers["x-nearvoice-cache"] == "miss"  # another object: its spec has rate
    assert pcm.headers["content-type"] == "audio/pcm;rate=24000;channels=1;encoding=s16le"
    own = np.frombuffer(wav.body[44:], "<i2")
    resampled = np.frombuffer(pcm.body, "<i2")
    expected = len(own) * 24000 / 22050
    assert abs(len(resampled) - expected) < 0.01 * expected
    assert pcm.headers["content-location"].split("?")[0] != wav.headers["content-location"].split(
        "?"
    )[0].replace(".wav", ".pcm")


@in_module_loop
async def test_sse_for_an_origin_only_voice(pair: Pair) -> None:
    text = line()
    sdk = pair.a.sdk()
    sse = await speak(sdk, input=text, voice="joe", response_format="mp3", stream_format="sse")
    events = sse_events(sse.body)
    assert events[-1]["type"] == "speech.audio.done"
    raw = await speak(sdk, input=text, voice="joe", response_format="mp3")
    assert raw.headers["x-nearvoice-cache"] == "hit"
    assert sse_audio(events) == raw.body
