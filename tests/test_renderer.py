"""edge.synth.renderer: the order in which a render hands over its length and its bytes,
with the real engines."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.edge.synth.renderer import LENGTH_FREE, LengthMismatch, Renderer
from nearvoice.edge.synth.streaming import stream_encoder
from tests.support import MiscountingEngine, WrappedEngine

TEXT = "The first phrase leaves at once. The length follows it, exactly. Then the rest."


@pytest.fixture(scope="module")
def engines() -> list[Engine]:
    return [HibariEngine(threads=1), PiperEngine(voices=("joe",), threads=1)]


async def render_events(
    engines: list[Engine], engine: Engine, spec: Spec, later: bool
) -> tuple[list[str], bytes, list[int | None]]:
    """What the render handed over, in order: `later`, `length` and `bytes` events."""
    renderer = Renderer(engines, workers=2, metrics=Metrics())
    events: list[str] = []
    pieces: list[bytes] = []
    lengths: list[int | None] = []

    def sink(data: bytes) -> None:
        events.append("bytes")
        pieces.append(data)

    def on_length(length: int | None) -> None:
        events.append("length")
        lengths.append(length)

    try:
        await renderer.render(
            engine, spec, sink, on_length, (lambda: events.append("later")) if later else None
        )
    finally:
        renderer.close()
    return events, b"".join(pieces), lengths


@pytest.mark.parametrize("fmt", [AudioFormat.PCM, AudioFormat.MP3, AudioFormat.WAV])
@pytest.mark.parametrize(("voice", "rate"), [("heart", None), ("joe", None), ("joe", 24000)])
async def test_a_length_free_format_sends_its_first_chunk_before_the_length(
    engines: list[Engine], voice: str, rate: int | None, fmt: AudioFormat
) -> None:
    engine = next(e for e in engines if voice in e.voices)
    spec = Spec.create(text=TEXT, voice=voice, format=fmt, model=engine.model_id(voice), rate=rate)
    events, data, lengths = await render_events(engines, engine, spec, later=True)
    if fmt in LENGTH_FREE:  # the length comes after the first bytes, whenever the pass ends
        assert events[:2] == ["later", "bytes"] and events.index("length") > 1
    else:  # the header states the length: it comes first, and nothing is promised
        assert events[0] == "length" and "later" not in events
    assert events.count("length") == 1 and lengths == [len(data)]
    # The same bytes as a render that announces the length first.
    plain_events, plain, plain_lengths = await render_events(engines, engine, spec, later=False)
    assert plain_events[0] == "length" and plain == data and plain_lengths == lengths


@pytest.mark.parametrize("fmt", sorted(LENGTH_FREE, key=lambda f: f.value))
@pytest.mark.parametrize("rate", [16000, 22050, 24000])
def test_length_free_encoders_write_the_same_bytes_with_or_without_the_length(
    fmt: AudioFormat, rate: int
) -> None:
    audio = (0.3 * np.sin(np.arange(12345) / 7.0)).astype(np.float32)
    outputs = []
    for total in (None, len(audio)):
        encoder = stream_encoder(fmt, rate, total)
        outputs.append(
            b"".join([encoder.feed(audio[:5000]), encoder.feed(audio[5000:])]) + encoder.finish()
        )
    assert outputs[0] == outputs[1]


async def test_a_length_that_follows_is_still_checked_against_the_render() -> None:
    engine = MiscountingEngine(HibariEngine(threads=1), -100)  # promises too few
    spec = Spec.create(
        text=TEXT, voice="heart", format=AudioFormat.PCM, model=engine.model_id("heart")
    )
    with pytest.raises(LengthMismatch) as caught:
        await render_events([engine], engine, spec, later=True)
    assert caught.value.produced  # the first chunk had left: the stream is to be aborted


class PassWatcher(WrappedEngine):
    """The real engine, noting when its duration pass starts against its first chunk. Its
    first chunk waits (up to a minute) for the pass to start when `beside` is set: a
    render whose pass runs beside the first chunk goes on, one whose pass waits for the
    first chunk would stall, and the test says so."""

    def __init__(self, inner: Engine, beside: bool) -> None:
        super().__init__(inner)
        self.beside = beside
        self.events: list[str] = []
        self.pass_started = threading.Event()

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        self.events.append("pass")
        self.pass_started.set()
        return super().samples(text, voice, speed)

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        chunks = super().stream(text, voice, speed, seed)
        first = next(chunks)
        if self.beside and not self.pass_started.wait(60):
            self.events.append("stalled")
        self.events.append("first chunk")
        yield first
        yield from chunks


@pytest.mark.parametrize(
    ("fmt", "later", "beside"),
    [
        (AudioFormat.PCM, True, False),  # the first chunk leaves before the length
        (AudioFormat.PCM, False, True),  # the length comes first
        (AudioFormat.WAV, True, True),  # the header states the length
    ],
)
async def test_a_first_chunk_that_need_not_wait_for_the_length_renders_before_the_pass(
    engines: list[Engine], fmt: AudioFormat, later: bool, beside: bool
) -> None:
    engine = PassWatcher(engines[1], beside)
    spec = Spec.create(text=TEXT, voice="joe", format=fmt, model=engine.model_id("joe"))
    events, data, lengths = await render_events([engine], engine, spec, later)
    assert lengths == [len(data)]
    if beside:
        assert engine.events == ["pass", "first chunk"]
    else:
        assert engine.events == ["first chunk", "pass"]
        assert events[:2] == ["later", "bytes"] and "length" in events


class HeldPass(WrappedEngine):
    """The real engine, whose duration pass waits (up to a minute) until the render has
    yielded its last chunk, noting whether it had to give up."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner)
        self.rendered = threading.Event()
        self.gave_up = False

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        self.gave_up = not self.rendered.wait(60)
        return super().samples(text, voice, speed)

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        yield from super().stream(text, voice, speed, seed)
        self.rendered.set()


@pytest.mark.parametrize("voice", ["heart", "joe"])
async def test_an_early_render_streams_on_while_its_pass_counts(
    engines: list[Engine], voice: str
) -> None:
    """The stream of a text does not pause for its count after the first chunk: with the
    pass held until the render has run, every chunk is handed over, then the length."""
    inner = next(e for e in engines if voice in e.voices)
    engine = HeldPass(inner)
    spec = Spec.create(text=TEXT, voice=voice, format=AudioFormat.PCM, model=engine.model_id(voice))
    events, data, lengths = await render_events([engine], engine, spec, later=True)
    assert not engine.gave_up
    assert events[0] == "later" and events.count("length") == 1
    # Every chunk of audio was handed over before the length (after it, at most the
    # encoder's last bytes), and the length is the whole body's.
    assert events.index("length") >= len(events) - 2 and events.count("bytes") > 2
    assert lengths == [len(data)]
    _, plain, _ = await render_events([inner], inner, spec, later=False)
    assert plain == data


async def test_an_early_render_starts_its_pass_once_its_readers_have_the_first_chunk(
    engines: list[Engine],
) -> None:
    """The pass starts by phonemizing, which keeps the GIL: it must not start while the
    event loop writes the first chunk out."""
    engine = PassWatcher(engines[1], beside=False)
    spec = Spec.create(text=TEXT, voice="joe", format=AudioFormat.PCM, model=engine.model_id("joe"))
    renderer = Renderer([engine], workers=2, metrics=Metrics())
    arrived = asyncio.Event()

    async def reader() -> None:
        await arrived.wait()
        engine.events.append("read")

    reading = asyncio.create_task(reader())
    try:
        await renderer.render(engine, spec, lambda _: arrived.set(), lambda _: None, lambda: None)
    finally:
        renderer.close()
    await reading
    assert engine.events == ["first chunk", "read", "pass"]
