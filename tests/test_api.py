"""The OpenAI-compatible speech API through the official `openai` SDK, against a real node
on loopback rendering `heart` with hibari.

Covers: streamed answers (`stream_to_file`, `iter_bytes`), every response format decoded by
ffmpeg (codec, rate, duration), SSE deltas against the raw body, the cache behind the door
(hit on a repeat, one render for concurrent requests, bypass for a draft tenant, the
Content-Location URL serving the same object), each error as the SDK's exception type,
rate limits (429 with its fields, no render started), faults after the 200 (a raw stream
cut short, an SSE error event), and the metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import pytest_asyncio

from nearvoice.edge.apikeys import ApiKeys
from nearvoice.edge.config import SynthSettings
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.hibari_engine import HibariEngine, hibari_model_id
from nearvoice.edge.synth.piper_engine import piper_model_id
from tests.api_support import (
    ACME,
    API_SETTINGS,
    DRAFTY,
    LIMITED,
    ApiNode,
    api_node,
    decoded_seconds,
    probe,
    speak,
    sse_audio,
    sse_events,
)
from tests.support import (
    WrappedEngine,
    eventually,
    make_config,
    metric_from,
    put_object,
    scrape_until,
)
from tests.test_engine_faults import FailingEngine
from tests.test_inflight import HeldEngine
from tests.test_upstream import closed_port_base

pytestmark = pytest.mark.slow
in_module_loop = pytest.mark.asyncio(loop_scope="module")
_CASES = itertools.count(1)
SYNTH = "nearvoice_synth_total"


def line(text: str = "The speech API answers this line.") -> str:
    """A text no other test uses, so each test starts from a miss."""
    return f"{text} Case {next(_CASES)}."


def heart_key(text: str, fmt: AudioFormat = AudioFormat.MP3, speed: float = 1.0) -> str:
    spec = Spec.create(
        text=text, voice="heart", format=fmt, model=hibari_model_id("heart"), speed=speed
    )
    return spec.key


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[ApiNode, Any]]:
    engine = HeldEngine(HibariEngine(("heart",), threads=1), hold_at=None)
    config = make_config(
        tmp_path_factory.mktemp("api"),
        synth=SynthSettings(workers=1, max_queue=1),
        api=API_SETTINGS,
    )
    async with api_node(config, [engine]) as node:
        yield node, engine
        engine.release()


@pytest_asyncio.fixture(loop_scope="module")
async def api(shared: tuple[ApiNode, HeldEngine]) -> AsyncIterator[ApiNode]:
    node, engine = shared
    yield node
    engine.run_freely()
    await eventually(node.idle)


@pytest.fixture
def engine(shared: tuple[ApiNode, HeldEngine]) -> HeldEngine:
    return shared[1]


async def synth_count(api: ApiNode) -> float:
    return metric_from(await api.metrics(), SYNTH, engine="hibari")


# -- answers ----------------------------------------------------------------------------------


@in_module_loop
async def test_stream_to_file_and_iter_bytes_give_the_same_mp3(
    api: ApiNode, tmp_path: Path
) -> None:
    text = line()
    sdk = api.sdk()
    path = tmp_path / "speech.mp3"
    async with sdk.audio.speech.with_streaming_response.create(
        model="tts-1", voice="heart", input=text
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mpeg"
        assert response.headers["x-nearvoice-cache"] == "miss"
        await response.stream_to_file(path)
    again = await speak(sdk, input=text)
    assert again.headers["x-nearvoice-cache"] == "hit"
    assert again.body == path.read_bytes()
    info = await probe(path)
    assert (info["codec_name"], info["sample_rate"], info["channels"]) == ("mp3", "24000", "1")
    assert 1.0 < await decoded_seconds(path) < 6.0


FORMATS = {
    "mp3": ("mp3", 24000),
    "opus": ("opus", 48000),  # ffmpeg decodes Opus at 48 kHz
    "aac": ("aac", 24000),
    "flac": ("flac", 24000),
    "wav": ("pcm_s16le", 24000),
}


@in_module_loop
async def test_every_format_decodes_at_its_rate_with_the_same_duration(
    api: ApiNode, tmp_path: Path
) -> None:
    text = line("Every format carries the same words.")
    sdk = api.sdk()
    pcm = await speak(sdk, input=text, response_format="pcm")
    assert pcm.headers["content-type"] == "audio/pcm;rate=24000;channels=1;encoding=s16le"
    seconds = len(pcm.body) / 2 / 24000
    assert seconds > 1.0
    for name, (codec, rate) in FORMATS.items():
        answer = await speak(sdk, input=text, response_format=name)
        assert answer.status == 200, name
        path = tmp_path / f"speech.{name}"
        path.write_bytes(answer.body)
        info = await probe(path)
        assert (info["codec_name"], int(info["sample_rate"])) == (codec, rate), name
        # Lossy codecs add their encoder delay and padding: at most a few frames.
        assert abs(await decoded_seconds(path) - seconds) < 0.15, name
    wav = await speak(sdk, input=text, response_format="wav")
    assert wav.body[44:] == pcm.body  # heart is 24 kHz: the same samples, no resampling


@in_module_loop
async def test_sse_deltas_reassemble_into_the_raw_body(api: ApiNode) -> None:
    text = line("Events carry the audio in pieces. Then they say it is done.")
    sdk = api.sdk()
    sse = await speak(sdk, input=text, response_format="wav", stream_format="sse")
    assert sse.headers["content-type"] == "text/event-stream"
    assert sse.headers["x-nearvoice-cache"] == "miss"
    events = sse_events(sse.body)
    assert [e["type"] for e in events[-1:]] == ["speech.audio.done"]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    raw = await speak(sdk, input=text, response_format="wav")
    assert raw.headers["x-nearvoice-cache"] == "hit"
    assert sse_audio(events) == raw.body
    assert events[-1]["usage"]["output_bytes"] == len(raw.body)
    # A hit as events: the same audio again.
    again = sse_events(
        (await speak(sdk, input=text, response_format="wav", stream_format="sse")).body
    )
    assert sse_audio(again) == raw.body


@in_module_loop
async def test_models_and_voices(api: ApiNode) -> None:
    sdk = api.sdk()
    models = [m.id async for m in sdk.models.list()]
    assert models == ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "nearvoice"]
    async with api.client.get(
        "/v1/audio/voices", headers={"Authorization": f"Bearer {ACME}"}
    ) as resp:
        assert resp.status == 200
        voices = {v["id"]: v for v in (await resp.json())["voices"]}
    assert voices["heart"] == {
        "id": "heart",
        "name": "heart",
        "engine": "hibari",
        "sample_rate": 24000,
        "controls": ["duration", "ipa", "lang"],
    }
    assert voices["alloy"]["name"] == "heart"
    assert voices["joe"]["sample_rate"] == 22050


# -- one cache behind every door --------------------------------------------------------------


@in_module_loop
async def test_a_repeat_is_a_hit_and_content_location_serves_the_same_object(
    api: ApiNode,
) -> None:
    text = line()
    sdk = api.sdk()
    before = await synth_count(api)
    first = await speak(sdk, input=text, response_format="wav")
    assert first.headers["x-nearvoice-cache"] == "miss"
    after_first = await synth_count(api)
    assert after_first == before + 1
    second = await speak(sdk, input=text, response_format="wav", model="gpt-4o-mini-tts")
    assert second.headers["x-nearvoice-cache"] == "hit"
    assert second.body == first.body
    assert await synth_count(api) == after_first  # the model id does not change the render
    # The same object through the alias, named by id, and through its signed URL.
    alias = await speak(sdk, input=text, response_format="wav", voice={"id": "alloy"})
    assert alias.headers["x-nearvoice-cache"] == "hit"
    location = first.headers["content-location"]
    assert location.split("?")[0] == alias.headers["content-location"].split("?")[0]
    assert f"/v1/speech/{heart_key(text, AudioFormat.WAV)}.wav?" in location
    async with httpx2.AsyncClient() as player:
        got = await player.get(location)
    assert got.status_code == 200
    assert got.content == first.body
    assert await synth_count(api) == after_first


@in_module_loop
async def test_concurrent_identical_requests_share_one_render(
    api: ApiNode, engine: HeldEngine
) -> None:
    text = line("Four listeners ask at once. One render answers them all.")
    sdk = api.sdk()
    before = await synth_count(api)
    engine.hold(at=1)
    tasks = [asyncio.create_task(speak(sdk, input=text, response_format="wav")) for _ in range(4)]
    key = heart_key(text, AudioFormat.WAV)
    await eventually(lambda: key in api.node._fills and api.node._fills[key].readers == 4)
    engine.release()
    answers = await asyncio.gather(*tasks)
    assert len({a.body for a in answers}) == 1
    assert sorted(a.headers["x-nearvoice-cache"] for a in answers) == [
        "collapsed",
        "collapsed",
        "collapsed",
        "miss",
    ]
    assert await synth_count(api) == before + 1


@in_module_loop
async def test_a_draft_tenant_bypasses_the_cache(api: ApiNode) -> None:
    text = line()
    sdk = api.sdk(DRAFTY)
    before = await synth_count(api)
    first = await speak(sdk, input=text, response_format="wav")
    second = await speak(sdk, input=text, response_format="wav")
    assert first.headers["x-nearvoice-cache"] == second.headers["x-nearvoice-cache"] == "bypass"
    assert first.body == second.body  # renders are deterministic
    assert await synth_count(api) == before + 2
    assert "p=draft" in first.headers["content-location"]


@in_module_loop
async def test_speed_outside_the_engines_range_is_clamped(api: ApiNode) -> None:
    sdk = api.sdk()
    text = line()
    fast = await speak(sdk, input=text, response_format="pcm", speed=4.0)
    assert fast.headers["x-nearvoice-speed"] == "2"
    clamped = await speak(sdk, input=text, response_format="pcm", speed=2.0)
    assert clamped.headers["x-nearvoice-cache"] == "hit"  # the same spec as speed 4
    slow = await speak(sdk, input=text, response_format="pcm", speed=0.25)
    assert slow.headers["x-nearvoice-speed"] == "0.5"
    assert len(slow.body) > 2 * len(fast.body)


@in_module_loop
async def test_instructions_are_accepted_and_ignored(api: ApiNode) -> None:
    sdk = api.sdk()
    text = line()
    plain = await speak(sdk, input=text, response_format="wav")
    instructed = await speak(
        sdk, input=text, response_format="wav", instructions="Speak cheerfully."
    )
    assert instructed.headers["x-nearvoice-cache"] == "hit"
    assert instructed.body == plain.body


# -- errors as the SDK's exception types ------------------------------------------------------


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    return body


@in_module_loop
async def test_a_wrong_key_is_an_authentication_error(api: ApiNode) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await speak(api.sdk("not-a-key-of-this-node"), input="Hello.")
    assert _error(caught.value)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await api.sdk("nope").models.list()


@in_module_loop
async def test_bad_requests_are_bad_request_errors(api: ApiNode) -> None:
    sdk = api.sdk()
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"voice": "nova"}, "voice", "unknown_voice"),
        ({"input": "x" * 4097}, "input", "string_above_max_length"),
        ({"response_format": "ogg"}, "response_format", "invalid_value"),
        ({"speed": 5.0}, "speed", "invalid_value"),
        ({"speed": 0.2}, "speed", "invalid_value"),
        ({"model": "tts-2"}, "model", "invalid_value"),
        ({"extra_body": {"colour": "blue"}}, "colour", "unknown_parameter"),
        ({"extra_body": {"emotion": {"label": "happy"}}}, "emotion", "unsupported_control"),
        ({"extra_body": {"ref": "ref_" + "0" * 64}}, "ref", "unsupported_control"),
        ({"extra_body": {"duration": 1.0}, "speed": 1.5}, "duration", "conflicting_controls"),
        ({"extra_body": {"emotion": {"vector": [0.5] * 7}}}, "emotion", "bad_emotion"),
        ({"stream_format": "chunks"}, "stream_format", "invalid_value"),
    ]
    before = await synth_count(api)
    for params, param, code in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await speak(sdk, **{"input": "Hello.", **params})
        error = _error(caught.value)
        assert (error["param"], error["code"], error["type"]) == (
            param,
            code,
            "invalid_request_error",
        ), params
    with pytest.raises(openai.BadRequestError) as caught:
        await speak(sdk, input="Hello.", voice="nova")
    message = _error(caught.value)["message"]
    assert "heart" in message and "alloy" in message and "joe" in message
    assert await synth_count(api) == before


@in_module_loop
async def test_a_body_that_is_not_json_is_400_and_an_oversized_one_413(api: ApiNode) -> None:
    auth = {"Authorization": f"Bearer {ACME}"}
    async with api.client.post("/v1/audio/speech", data=b"{not json", headers=auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"
    big = b'{"input": "' + b"x" * 70000 + b'"}'
    async with api.client.post("/v1/audio/speech", data=big, headers=auth) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "body_too_large"


@in_module_loop
async def test_without_api_keys_the_api_says_how_to_enable_it(api: ApiNode, tmp_path: Path) -> None:
    config = make_config(tmp_path, synth=SynthSettings(enabled=False))
    async with api_node(config, [], keys=ApiKeys()) as bare:
        with pytest.raises(openai.AuthenticationError) as caught:
            await speak(bare.sdk(), input="Hello.")
        error = _error(caught.value)
        assert error["code"] == "api_disabled"
        assert "NEARVOICE_API_KEYS" in error["message"]


@in_module_loop
async def test_rate_limits_answer_429_and_start_no_render(api: ApiNode) -> None:
    sdk = api.sdk(LIMITED)
    first, second = line(), line()
    await speak(sdk, input=first, response_format="wav")  # the one miss of the burst
    before = await api.metrics()
    with pytest.raises(openai.RateLimitError) as caught:
        await speak(sdk, input=second, response_format="wav")
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["ratelimit-policy"].startswith('"api-miss";q=1;w=')
    assert headers["ratelimit"].startswith('"api-miss";r=0;t=')
    assert _error(caught.value)["type"] == "rate_limit_error"
    after = await api.metrics()
    assert metric_from(after, SYNTH, engine="hibari") == metric_from(before, SYNTH, engine="hibari")
    assert heart_key(second, AudioFormat.WAV) not in api.node._fills
    limited = "nearvoice_rate_limited_total"
    assert metric_from(after, limited, scope="api") == metric_from(before, limited, scope="api") + 1
    # Hits spend the hit budget (a burst of 2), not the exhausted miss budget.
    for _ in range(2):
        hit = await speak(sdk, input=first, response_format="wav")
        assert hit.headers["x-nearvoice-cache"] == "hit"
    with pytest.raises(openai.RateLimitError) as caught:
        await speak(sdk, input=first, response_format="wav")
    assert caught.value.response.headers["ratelimit-policy"].startswith('"api-hit";q=2;')
    # Another tenant is not limited by this one's buckets.
    assert (await speak(api.sdk(), input=second, response_format="wav")).status == 200


@in_module_loop
async def test_a_full_render_queue_is_503_with_retry_after(
    api: ApiNode, engine: HeldEngine
) -> None:
    sdk = api.sdk()
    engine.hold(at=0)  # the node's queue holds one render (max_queue = 1)
    held = asyncio.create_task(speak(sdk, input=line(), response_format="wav"))
    await asyncio.to_thread(engine.holding.wait, 30)
    with pytest.raises(openai.InternalServerError) as caught:
        await speak(sdk, input=line(), response_format="wav")
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert _error(caught.value)["code"] == "overloaded"
    engine.release()
    assert (await held).status == 200


@in_module_loop
async def test_an_origin_only_voice_without_upstream_is_503(api: ApiNode) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await speak(api.sdk(), input=line(), voice="joe", response_format="wav")
    assert caught.value.status_code == 503
    assert _error(caught.value)["code"] == "no_renderer"


@in_module_loop
async def test_an_expired_copy_is_served_stale_when_the_fresh_one_cannot_be_had(
    api: ApiNode,
) -> None:
    text = line()
    spec = Spec.create(text=text, voice="joe", format=AudioFormat.WAV, model=piper_model_id("joe"))
    old = b"RIFF" + b"stale copy of joe" * 10
    # Past its 7-day TTL but within the store's stale-if-error keep; joe cannot be rendered.
    put_object(api.app, spec, old, stored_at=time.time() - 7 * 86400 - 600)
    answer = await speak(api.sdk(), input=text, voice="joe", response_format="wav")
    assert answer.headers["x-nearvoice-cache"] == "stale"
    assert int(answer.headers["age"]) >= 7 * 86400
    assert answer.body == old


@in_module_loop
async def test_an_unreachable_upstream_is_502(api: ApiNode, tmp_path: Path) -> None:
    config = make_config(
        tmp_path, synth=SynthSettings(enabled=False), upstreams=(closed_port_base(),)
    )
    async with api_node(config, []) as edge:
        with pytest.raises(openai.InternalServerError) as caught:
            await speak(edge.sdk(), input=line(), response_format="wav")
        assert caught.value.status_code == 502


# -- metrics ------------------------------------------------------------------------------------


@in_module_loop
async def test_api_requests_are_counted_by_endpoint_and_code(api: ApiNode) -> None:
    before = await api.metrics()
    name = "nearvoice_api_requests_total"
    for endpoint, code in (("speech", "429"), ("models", "401"), ("voices", "200")):
        assert (
            f'{name}{{code="{code}",endpoint="{endpoint}"}}' in before
            or f'{name}{{endpoint="{endpoint}",code="{code}"}}' in before
        )
    text = line()
    await speak(api.sdk(), input=text)
    with pytest.raises(openai.BadRequestError):
        await speak(api.sdk(), input=text, voice="nova")
    # The SDK has the whole body before the handler counts it: wait for the count.
    after = await scrape_until(
        api.client,
        lambda t: (
            metric_from(t, name, endpoint="speech", code="200")
            > metric_from(before, name, endpoint="speech", code="200")
        ),
    )

    def moved(**labels: str) -> float:
        return metric_from(after, name, **labels) - metric_from(before, name, **labels)

    assert moved(endpoint="speech", code="200") == 1
    assert moved(endpoint="speech", code="400") == 1
    requests = "nearvoice_requests_total"
    assert (
        metric_from(after, requests, result="miss") - metric_from(before, requests, result="miss")
        == 1
    )
    assert (
        metric_from(after, requests, result="rejected")
        - metric_from(before, requests, result="rejected")
        == 1
    )


# -- faults after the 200 -----------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def faulty(tmp_path: Path) -> AsyncIterator[tuple[ApiNode, threading.Event]]:
    go_ahead = threading.Event()
    failing = FailingEngine(HibariEngine(("heart",), threads=1), 1, go_ahead)
    config = make_config(tmp_path, synth=SynthSettings(workers=1), api=API_SETTINGS)
    async with api_node(config, [failing]) as node:
        yield node, go_ahead
        go_ahead.set()


TEXT_THAT_FAILS = "The first sentence renders. The second one never does. Nor does the third."


@in_module_loop
async def test_a_render_failing_mid_stream_cuts_the_raw_body(
    faulty: tuple[ApiNode, threading.Event],
) -> None:
    node, go_ahead = faulty
    sdk = node.sdk()
    got = b""
    with pytest.raises(httpx2.RemoteProtocolError):
        async with sdk.audio.speech.with_streaming_response.create(
            model="tts-1", voice="heart", input=TEXT_THAT_FAILS, response_format="wav"
        ) as response:
            assert response.status_code == 200
            async for chunk in response.iter_bytes():
                got += chunk
                go_ahead.set()  # the first sentence arrived; now let the render fail
    assert got[:4] == b"RIFF"


@in_module_loop
async def test_a_render_failing_mid_stream_ends_sse_with_an_error_event(
    faulty: tuple[ApiNode, threading.Event],
) -> None:
    node, go_ahead = faulty
    go_ahead.set()
    answer = await speak(
        node.sdk(),
        input=TEXT_THAT_FAILS,
        response_format="wav",
        stream_format="sse",
    )
    events = sse_events(answer.body)
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "render_failed"
    assert "speech.audio.done" not in {e["type"] for e in events}


@in_module_loop
async def test_the_spec_extensions_reach_the_spec(api: ApiNode) -> None:
    sdk = api.sdk()
    fitted = await speak(
        sdk, input="Fitted to the second.", response_format="wav", extra_body={"duration": 2.4}
    )
    assert fitted.status == 200
    import io

    import soundfile

    audio, rate = soundfile.read(io.BytesIO(fitted.body))
    assert abs(len(audio) / rate - 2.4) <= max(0.02 * 2.4, 600 / rate)
    # `lang` and an IPA hint are honoured by hibari; `instructions` is ignored for a voice
    # whose engine does not honour emotion (the same object as without it).
    hinted = {"input": "Say [tomato](/təmˈɑːtoʊ/).", "response_format": "wav"}  # noqa: RUF001
    plain = await speak(sdk, **hinted, extra_body={"lang": "en-US"})
    told = await speak(sdk, **hinted, instructions="Speak warmly.", extra_body={"lang": "en-US"})
    assert plain.status == told.status == 200 and plain.body == told.body


# -- a raw stream does not wait for the length --------------------------------------------------


class HeldPass(WrappedEngine):
    """`heart`, with a duration pass that waits for `release` (the render itself runs)."""

    def __init__(self, inner: HibariEngine) -> None:
        super().__init__(inner)
        self.counting = threading.Event()
        self.release = threading.Event()

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        if not text.startswith("Warm up"):
            self.counting.set()
            self.release.wait(30)
        return self._inner.samples(text, voice, speed)


async def test_a_raw_pcm_stream_starts_before_the_length_and_ranges_wait_for_it(
    tmp_path: Path,
) -> None:
    """PCM's bytes never depend on the length: the API's raw stream gets the first chunk
    while the duration pass still runs, and a signed URL's `bytes=0-` on the same object
    waits for the length, then answers it exactly."""
    engine = HeldPass(HibariEngine(("heart",), threads=1))
    config = make_config(tmp_path, synth=SynthSettings(workers=2), api=API_SETTINGS)
    async with api_node(config, [engine]) as node:  # type: ignore[list-item]
        sdk = node.sdk()
        text = line("The first chunk leaves before the pass ends. Then the rest follows.")
        try:
            async with sdk.audio.speech.with_streaming_response.create(
                model="tts-1", voice="heart", input=text, response_format="pcm"
            ) as response:
                chunks = response.iter_bytes()
                first = await anext(chunks)
                assert first and not engine.release.is_set()  # the pass cannot have ended
                # It starts once the first chunk has left (edge.synth.renderer).
                assert await asyncio.to_thread(engine.counting.wait, 30)
                assert "content-length" not in response.headers  # not known yet: chunked
                url = response.headers["content-location"]
                fill = next(iter(node.node._fills.values()))
                assert not fill.sized
                ranged = asyncio.ensure_future(
                    node.client.session.get(url, headers={"Range": "bytes=0-"})
                )
                await eventually(lambda: fill.readers == 2)
                assert not ranged.done()  # an exact answer needs the length
                engine.release.set()
                body = first + b"".join([chunk async for chunk in chunks])
        finally:
            engine.release.set()
        async with await ranged as answer:
            assert answer.status == 206
            assert answer.headers["Content-Range"] == f"bytes 0-{len(body) - 1}/{len(body)}"
            assert await answer.read() == body
