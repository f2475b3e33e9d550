"""The duration pass (edge/synth/durations.py and each engine's `samples`): the count an
engine gives before rendering is the number of samples its render then yields, for the
fixed sentences, for random texts and speeds, and for exported variants."""

from __future__ import annotations

import string
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nearvoice.edge import activity
from nearvoice.edge.synth import exported
from nearvoice.edge.synth.chunking import split_chunks
from nearvoice.edge.synth.durations import Durations, NoDurationPath, extract
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import BUNDLED, PiperEngine
from nearvoice.edge.synth.vits_engine import VitsEngine
from nearvoice.edge.synth.windows import Settings
from nearvoice.export.sentences import SENTENCES
from tests.export_support import graph_with_inputs

pytestmark = pytest.mark.slow
SPEEDS = (0.5, 0.8, 1.0, 1.37, 2.0)


def rendered(engine: Engine, text: str, voice: str, speed: float, seed: int = 0) -> int:
    return sum(len(a) for a in engine.stream(text, voice, speed, seed))


@pytest.fixture(scope="module")
def heart() -> Iterator[HibariEngine]:
    engine = HibariEngine()
    engine.warmup()
    yield engine


@pytest.fixture(scope="module")
def joe() -> Iterator[PiperEngine]:
    engine = PiperEngine()
    engine.warmup()
    yield engine


# Random texts: words, numbers, abbreviations and initials, hints-free punctuation, in
# one or more sentences; and plain printable noise.
WORDS = st.sampled_from(
    ["hello", "there", "Lisbon", "quickly", "the", "a", "gate", "twelve", "I'm", "don't"]
) | st.text(alphabet=string.ascii_letters, min_size=1, max_size=9)
NUMBERS = st.one_of(
    st.integers(0, 10**7).map(str),
    st.sampled_from(["3.5", "1,000", "$9.99", "7:30", "2024", "50%", "0.001", "1st", "42nd"]),
)
ABBREVIATIONS = st.sampled_from(
    ["Dr.", "Mr.", "Mrs.", "e.g.", "i.e.", "etc.", "J.", "K.", "U.S.", "vs.", "No.", "St."]
)
MARKS = st.sampled_from([",", ";", ":", " -", " —", "...", "!", "?", "'", '"', "(", ")"])
TOKENS = st.one_of(WORDS, WORDS, WORDS, NUMBERS, ABBREVIATIONS, MARKS)
SENTENCE = st.tuples(
    st.lists(TOKENS, min_size=1, max_size=12).map(" ".join),
    st.sampled_from([".", "!", "?", "…", "", "."]),
).map("".join)
TEXTS = st.one_of(
    st.lists(SENTENCE, min_size=1, max_size=4).map(" ".join),
    st.text(alphabet=string.printable, min_size=1, max_size=60),
)
SPEED = st.floats(min_value=0.5, max_value=2.0, allow_nan=False)
PROPERTY = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# The pass itself.


def test_a_graph_without_durations_has_no_pass(tmp_path: Path) -> None:
    model = graph_with_inputs(tmp_path / "g.onnx", ["ids"])
    with pytest.raises(NoDurationPath):
        extract(model)
    durations = Durations(model, 1, ["CPUExecutionProvider"], lambda g: 1)
    assert durations.samples({"ids": np.zeros((1, 3), np.float32)}) is None
    assert durations.broken is not None


def test_an_unreadable_model_has_no_pass(tmp_path: Path) -> None:
    model = tmp_path / "bad.onnx"
    model.write_bytes(b"not a model")
    durations = Durations(model, 1, ["CPUExecutionProvider"], lambda g: 1)
    assert durations.samples({"ids": np.zeros((1, 3), np.int64)}) is None
    assert durations.broken is not None


def test_the_hibari_pass_is_the_text_side_of_the_graph() -> None:
    from hibari.voices import voice_path

    graph = extract(Path(voice_path("heart")))
    assert graph.inputs == {"ids", "speed"}
    assert graph.nodes < graph.source_nodes / 2
    assert graph.upsampling == 1  # hibari's vocoder is hibari.dsp, on the host


# hibari (`heart`)


@pytest.mark.parametrize("speed", SPEEDS)
def test_heart_counts_what_it_renders(heart: HibariEngine, speed: float) -> None:
    for text in SENTENCES:
        assert heart.samples(text, "heart", speed) == rendered(heart, text, "heart", speed)


def test_heart_counts_a_long_text_and_its_clause_splits(heart: HibariEngine) -> None:
    long = " ".join(SENTENCES)
    # One sentence over hibari's MAX_PHONEMES (400) is split at its clauses.
    run_on = ", and ".join(s.rstrip(".!?") for s in SENTENCES[1:12]) + "."
    for text in (long, run_on):
        assert heart.samples(text, "heart", 1.0) == rendered(heart, text, "heart", 1.0, seed=5)


def test_heart_counts_texts_with_nothing_to_say(heart: HibariEngine) -> None:
    for text in ("", "...", "  ", "()"):
        assert heart.samples(text, "heart", 1.0) == rendered(heart, text, "heart", 1.0)


def as_hibari_renders(engine: HibariEngine, text: str, speed: float, seed: int) -> list[np.ndarray]:
    """`text` through `Hibari.from_ids` on the whole graph, with one noise generator."""
    model = engine._model("heart")
    rng = np.random.default_rng(seed)
    return [
        model.from_ids(model.ids(phonemes), speed, rng)
        for chunk in split_chunks(text)
        for phonemes in model.phonemize(chunk)
    ]


@pytest.mark.parametrize("speed", [0.7, 1.2])
def test_heart_renders_the_rest_after_the_pass_as_the_whole_graph(
    heart: HibariEngine, speed: float
) -> None:
    assert heart._durations["heart"].splits()
    for text in (*SENTENCES[::3], "Dr. Smith arrived at 7:30, e.g. early. The rest came later!"):
        reference = as_hibari_renders(heart, text, speed, 9)
        heart.samples(text, "heart", speed)
        assert same(list(heart.stream(text, "heart", speed, 9)), reference)  # after the pass
        assert same(list(heart.stream(text + " ", "heart", speed, 9)), reference)  # without


@PROPERTY
@given(text=TEXTS, speed=SPEED)
def test_heart_counts_random_texts(heart: HibariEngine, text: str, speed: float) -> None:
    assert heart.samples(text, "heart", speed) == rendered(heart, text, "heart", speed, seed=1)


def test_a_pass_that_disagrees_with_the_render_is_disabled_by_warmup() -> None:
    from hibari.voices import voice_path

    engine = HibariEngine()
    wrong = Durations(Path(voice_path("heart")), 1, ["CPUExecutionProvider"], lambda g: 599)
    engine._durations["heart"] = wrong  # a model whose samples per frame were misread
    assert engine.samples("Hello there.", "heart", 1.0) is not None
    engine.warmup()
    assert wrong.broken is not None and "the render gave" in wrong.broken
    assert engine.samples("Hello there.", "heart", 1.0) is None
    assert rendered(engine, "Hello there.", "heart", 1.0) > 0  # renders go on


def test_samples_refuses_an_unknown_voice(heart: HibariEngine) -> None:
    with pytest.raises(ValueError, match="nova"):
        heart.samples("Hello.", "nova", 1.0)


def test_heart_counts_an_exported_variant(tmp_path: Path) -> None:
    from hibari.voices import voice_path

    from nearvoice.export.optimize import Options, optimize

    out = tmp_path / "heart"
    optimize(
        Path(voice_path("heart")),
        out,
        opts=Options(sentences=SENTENCES[:1], repeats=1, variants=["fp32-opt"], progress=False),
    )
    export = exported.load(out)
    variant = next(v for v in export.variants if v.name == "fp32-opt")
    choice = exported.Chosen("heart", export, variant, "cpu", "hibari-heart.fp32-opt@x")
    engine = HibariEngine(exported={"heart": choice})
    engine.warmup()
    for text in SENTENCES:
        counted = engine.samples(text, "heart", 0.9)
        audio = list(engine.stream(text, "heart", 0.9, 0))
        assert counted == sum(len(a) for a in audio)
        assert same(audio, as_hibari_renders(engine, text, 0.9, 0))


# piper (`joe`)


def test_the_piper_pass_stops_before_the_vocoder() -> None:
    graph = extract(BUNDLED["joe"].model_path())
    assert graph.inputs == {"input", "input_lengths", "scales"}
    assert graph.upsampling == 256  # joe-medium's hop_length
    assert b"ConvTranspose" not in graph.model  # no upsampling layer is in the pass
    assert graph.nodes < graph.source_nodes


@pytest.mark.parametrize("speed", [0.5, 1.0, 2.0])
def test_joe_counts_what_it_renders(joe: PiperEngine, speed: float) -> None:
    for text in SENTENCES:
        assert joe.samples(text, "joe", speed) == rendered(joe, text, "joe", speed)


def test_joe_counts_a_long_text_and_texts_with_nothing_to_say(joe: PiperEngine) -> None:
    for text in (" ".join(SENTENCES), "Wait... what?! No way. OK.", "", "  ", "()"):
        assert joe.samples(text, "joe", 1.37) == rendered(joe, text, "joe", 1.37)


@settings(PROPERTY, max_examples=12)
@given(text=TEXTS, speed=SPEED)
def test_joe_counts_random_texts(joe: PiperEngine, text: str, speed: float) -> None:
    assert joe.samples(text, "joe", speed) == rendered(joe, text, "joe", speed)


def as_piper_renders(engine: PiperEngine, text: str, speed: float) -> list[np.ndarray]:
    """`text` through piper's own `PiperVoice.synthesize` on the whole graph's session."""
    from piper import PiperVoice

    loaded = engine._voice("joe")
    voice = PiperVoice(session=engine.session("joe"), config=loaded.config)
    synthesis = engine._synthesis(loaded, speed)
    return [
        np.clip(np.asarray(chunk.audio_float_array, np.float32), -1.0, 1.0)
        for part in split_chunks(text)
        for chunk in voice.synthesize(part, synthesis)
    ]


def same(one: list[np.ndarray], other: list[np.ndarray]) -> bool:
    return len(one) == len(other) and all(
        a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(one, other, strict=True)
    )


def as_windowed(engine: PiperEngine, audio: list[np.ndarray], reference: list[np.ndarray]) -> bool:
    """Whether `audio` (a `stream`, its first piece in windows) is `reference` (whole
    pieces): the first piece within the windows' tolerance, every later one exactly."""
    windowed = engine._durations["joe"].windowed()
    assert windowed is not None
    first = len(reference[0])
    joined = np.concatenate(audio)
    rest = np.concatenate(reference[1:] or [np.zeros(0, np.float32)])
    return (
        sum(map(len, audio)) == sum(map(len, reference))
        and windowed.close_to(joined[:first], reference[0])
        and np.array_equal(joined[first:], rest)
    )


@pytest.mark.parametrize("speed", [0.6, 1.0, 1.9])
def test_joe_renders_the_rest_after_the_pass_as_the_whole_graph(
    joe: PiperEngine, speed: float
) -> None:
    assert joe._durations["joe"].splits()
    for text in (*SENTENCES[::2], "Wait... what?! No way."):
        reference = as_piper_renders(joe, text, speed)
        joe.samples(text, "joe", speed)
        assert same(list(joe._stream(text, "joe", speed)), reference)  # after the pass
        assert same(list(joe._stream(text + " ", "joe", speed)), reference)  # without
        joe.samples(text, "joe", speed)
        assert as_windowed(joe, list(joe.stream(text, "joe", speed, 0)), reference)


def test_joe_counts_and_renders_every_exported_variant(joe_export: Path) -> None:
    export = exported.load(joe_export)
    assert {v.name for v in export.variants} >= {"fp32", "fp16", "fp32-opt"}
    for variant in export.variants:
        choice = exported.Chosen("joe", export, variant, "cpu", f"piper-joe.{variant.name}@x")
        engine = PiperEngine(exported={"joe": choice})
        engine.warmup()
        for text in (*SENTENCES[:4], SENTENCES[-1]):
            counted = engine.samples(text, "joe", 0.85)
            audio = list(engine.stream(text, "joe", 0.85, 0))
            assert counted == sum(len(a) for a in audio), variant.name
            reference = as_piper_renders(engine, text, 0.85)
            if engine._durations["joe"].windowed() is None:
                assert same(audio, reference), variant.name
            else:
                assert as_windowed(engine, audio, reference), variant.name


def test_a_split_that_renders_other_samples_is_dropped_by_warmup() -> None:
    engine = PiperEngine()
    durations = engine._durations["joe"]
    assert durations.splits()
    rest = durations.rest
    durations.rest = lambda counted, feeds: [rest(counted, feeds)[0] * 0.5]  # type: ignore[method-assign]
    engine.warmup()
    assert not durations.splits() and durations.unsplit is not None
    assert same(
        list(engine.stream("Hello there.", "joe", 1.0, 0)),
        as_piper_renders(engine, "Hello there.", 1.0),
    )


def first_feeds(engine: PiperEngine, text: str) -> dict[str, np.ndarray]:
    """The graph's inputs for `text`'s first piece."""
    loaded = engine._voice("joe")
    return dict(
        engine._feeds(loaded, next(engine._pieces(loaded, text)), engine._synthesis(loaded, 1.0))
    )


def test_a_first_piece_is_counted_on_the_first_windows_threads_as_on_the_engines(
    joe: PiperEngine,
) -> None:
    durations = joe._durations["joe"]
    graph = durations.graph()
    assert graph is not None and durations.first_alike is None
    first, own = durations._first_session(graph), durations._session(graph)
    options = first.get_session_options()
    assert options.intra_op_num_threads == Settings().first_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert own.get_session_options().intra_op_num_threads == 1
    for text in (*SENTENCES[:8], " ".join(SENTENCES)):
        feeds = first_feeds(joe, text)
        on_two, on_one = durations.count(feeds, first=True), durations.count(feeds)
        assert on_two is not None and on_one is not None
        assert on_two.samples == on_one.samples
        assert all(
            np.array_equal(a, b) for a, b in zip(on_two.handoff, on_one.handoff, strict=True)
        )


class OneStepUp:
    """A real onnxruntime session whose float outputs come one float step higher."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def run(self, names: object, feeds: object) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self._inner.run(names, feeds)  # type: ignore[attr-defined]
        return [
            np.nextafter(o, np.inf, dtype=o.dtype) if o.dtype.kind == "f" else o for o in outputs
        ]


def test_first_pieces_are_counted_on_the_engines_threads_when_the_two_differ(
    joe: PiperEngine,
) -> None:
    engine = PiperEngine()
    durations = engine._durations["joe"]
    graph = durations.graph()
    assert graph is not None
    durations._local.first = OneStepUp(durations._first_session(graph))
    engine.warmup()
    assert durations.first_alike is not None
    assert durations._first_session(graph) is durations._session(graph)
    text = "Your order has shipped and will arrive on Tuesday. Please hold."
    assert [a.tobytes() for a in engine.stream(text, "joe", 1.0, 0)] == [
        a.tobytes() for a in joe.stream(text, "joe", 1.0, 0)
    ]


def test_a_first_piece_may_spin_only_alone_and_one_render_at_a_time(joe: PiperEngine) -> None:
    durations = joe._durations["joe"]
    assert durations.unspun is None
    with durations.spinning() as spin:
        assert spin
        with durations.spinning() as second:  # another render, alone too: it sleeps
            assert not second
    with durations.spinning() as again:  # released
        assert again
    activity.RENDERS.started()
    activity.RENDERS.started()  # two renders in flight: neither is alone
    try:
        with durations.spinning() as busy:
            assert not busy
    finally:
        activity.RENDERS.ended()
        activity.RENDERS.ended()


def test_the_spinning_count_is_the_sleeping_one_bit_for_bit(joe: PiperEngine) -> None:
    durations = joe._durations["joe"]
    graph = durations.graph()
    assert graph is not None
    spinning = durations._spinning_session(graph)
    assert spinning is not durations._first_session(graph)
    options = spinning.get_session_options()
    assert options.intra_op_num_threads == Settings().first_threads == 2
    # onnxruntime's default, spinning, held to the runs themselves (providers.session)
    with pytest.raises(RuntimeError, match="allow_spinning"):
        options.get_session_config_entry("session.intra_op.allow_spinning")
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    with ThreadPoolExecutor(1) as other:  # one per process, not per thread
        assert other.submit(durations._spinning_session, graph).result() is spinning
    for text in (*SENTENCES[:8], " ".join(SENTENCES)):
        feeds = first_feeds(joe, text)
        spun, slept = durations.count(feeds, True, spin=True), durations.count(feeds, True)
        assert spun is not None and slept is not None
        assert spun.samples == slept.samples
        assert all(np.array_equal(a, b) for a, b in zip(spun.handoff, slept.handoff, strict=True))


def test_first_pieces_never_spin_when_the_spinning_sessions_differ(joe: PiperEngine) -> None:
    engine = PiperEngine()
    durations = engine._durations["joe"]
    graph = durations.graph()
    assert graph is not None
    durations._spinning = OneStepUp(durations._spinning_session(graph))
    engine.warmup()
    assert durations.unspun is not None and durations.first_alike is None
    with durations.spinning() as spin:
        assert not spin
    text = "Your order has shipped and will arrive on Tuesday. Please hold."
    assert [a.tobytes() for a in engine.stream(text, "joe", 1.0, 0)] == [
        a.tobytes() for a in joe.stream(text, "joe", 1.0, 0)
    ]


# vits (a tiny random transformers VitsModel through from-transformers and optimize)


def tiny_engine(export_dir: Path, name: str) -> VitsEngine:
    export = exported.load(export_dir)
    variant = next(v for v in export.variants if v.name == name)
    return VitsEngine(exported.Chosen("tiny", export, variant, "cpu", f"vits-tiny.{name}@x"))


@pytest.fixture(scope="module")
def tiny(tiny_optimized: Path) -> Iterator[VitsEngine]:
    engine = tiny_engine(tiny_optimized, "fp32")
    engine.warmup()
    yield engine


@pytest.fixture(scope="module")
def reading(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny voice whose durations depend on the text: the shared tiny checkpoint's
    stochastic duration predictor keeps only its affine flow when inverted, so its
    durations are the same for every token; the deterministic predictor reads the text
    encoder's output, as real checkpoints' predictors do."""
    import torch
    from transformers import VitsConfig, VitsModel

    from nearvoice.export.from_transformers import export
    from nearvoice.export.optimize import Options, optimize
    from tests.export_support import TINY_VITS, save_tiny_vits

    root = tmp_path_factory.mktemp("reading")
    checkpoint = save_tiny_vits(root / "checkpoint")
    torch.manual_seed(0)
    config = VitsConfig(**{**TINY_VITS, "use_stochastic_duration_prediction": False})
    VitsModel(config).eval().save_pretrained(str(checkpoint))
    export(checkpoint, root / "export", progress=False)
    opts = Options(variants=["fp32"], sentences=SENTENCES[:1], repeats=1, progress=False)
    optimize(root / "export" / "model.onnx", root / "voice", opts=opts)
    return root / "voice"


@pytest.fixture(scope="module")
def reader(reading: Path) -> Iterator[VitsEngine]:
    engine = tiny_engine(reading, "fp32")
    engine.warmup()
    yield engine


def test_a_vits_pass_reads_the_text(reading: Path, reader: VitsEngine) -> None:
    assert "input_ids" in extract(reading / "fp32.onnx").inputs
    counts = {reader.samples(text, "tiny", 1.0) for text in SENTENCES}
    assert len(counts) > 10  # not a constant per token
    for speed in SPEEDS:
        for text in (*SENTENCES, " ".join(SENTENCES)):
            assert reader.samples(text, "tiny", speed) == rendered(reader, text, "tiny", speed)


@PROPERTY
@given(text=TEXTS, speed=SPEED)
def test_a_vits_voice_counts_random_texts(reader: VitsEngine, text: str, speed: float) -> None:
    assert reader.samples(text, "tiny", speed) == rendered(reader, text, "tiny", speed)


def test_the_vits_pass_stops_before_the_vocoder(tiny_optimized: Path) -> None:
    graph = extract(tiny_optimized / "fp32.onnx")
    assert graph.upsampling == 64  # upsample_rates [8, 8] of the tiny checkpoint
    assert b"ConvTranspose" not in graph.model
    assert graph.inputs <= {"input_ids", "attention_mask", "length_scale"}


@pytest.mark.parametrize("speed", SPEEDS)
def test_tiny_counts_what_it_renders(tiny: VitsEngine, speed: float) -> None:
    for text in (*SENTENCES, " ".join(SENTENCES), "", "123 456", "ÉCOLE"):
        assert tiny.samples(text, "tiny", speed) == rendered(tiny, text, "tiny", speed)


def test_tiny_counts_every_exported_variant(tiny_optimized: Path) -> None:
    names = [v.name for v in exported.load(tiny_optimized).variants]
    assert {"fp32", "fp32-opt", "fp16", "int8"} <= set(names)
    for name in names:
        engine = tiny_engine(tiny_optimized, name)
        for text in SENTENCES:
            assert engine.samples(text, "tiny", 0.7) == rendered(engine, text, "tiny", 0.7), name


def test_tiny_refuses_what_its_render_refuses(tiny: VitsEngine) -> None:
    with pytest.raises(ValueError, match="nova"):
        tiny.samples("Hello.", "nova", 1.0)
    with pytest.raises(ValueError, match="positive"):
        tiny.samples("Hello.", "tiny", 0.0)


# vits at MMS size (transformers' default VitsConfig, random weights; tests/conftest.py)


def test_an_mms_sized_voice_counts_what_it_renders(mms_voice: Path) -> None:
    graph = extract(mms_voice / "fp32.onnx")
    assert graph.upsampling == 256  # the default upsample_rates [8, 8, 2, 2]
    assert b"ConvTranspose" not in graph.model
    assert graph.nodes < graph.source_nodes
    engine = tiny_engine(mms_voice, "fp32")
    engine.warmup()
    for speed in (0.8, 1.37):
        for text in (*SENTENCES[::5], ""):
            assert engine.samples(text, "tiny", speed) == rendered(engine, text, "tiny", speed)
