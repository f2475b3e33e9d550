"""edge/synth/vits_engine.py and vits_text.py: a voice defined by a from-transformers
export, tokenized as transformers does it and rendered by the edge without torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.config import SynthSettings
from nearvoice.edge.synth import exported
from nearvoice.edge.synth.vits_engine import VitsEngine, vits_feeds
from nearvoice.edge.synth.vits_text import CharTokenizer, UnsupportedTokenizer, chunks
from nearvoice.edge.voices import for_config
from tests.support import make_config, metric, render_through_node

TEXT = "Hello there. This voice came from a transformers checkpoint!"


def tokenizer_of(export_dir: Path) -> CharTokenizer:
    return CharTokenizer.from_sidecar(json.loads((export_dir / "vits.json").read_text()))


def engine_for(export_dir: Path) -> VitsEngine:
    export = exported.load(export_dir)
    variant = exported.select(export, "cpu")
    return VitsEngine(exported.Chosen("tiny", export, variant, "cpu", "vits-tiny.x@y"))


@pytest.mark.slow
@pytest.mark.parametrize("text", ["Hello, World!", "  spaced  out  ", "ÉCOLE 42", "...", ""])
def test_ids_match_transformers_tokenizer(tiny_checkpoint: Path, text: str) -> None:
    from transformers import VitsTokenizer

    reference = VitsTokenizer.from_pretrained(str(tiny_checkpoint))
    ours = CharTokenizer.from_sidecar(
        {
            "vocab": json.loads((tiny_checkpoint / "vocab.json").read_text()),
            "add_blank": True,
            "lowercase": True,
            "phonemize": False,
        }
    )
    assert ours.ids(text) == reference(text)["input_ids"]


def test_phonemizing_tokenizers_are_refused() -> None:
    with pytest.raises(UnsupportedTokenizer, match="phonemize"):
        CharTokenizer.from_sidecar({"vocab": {"a": 1}, "phonemize": True})


def test_romanizing_tokenizers_are_refused() -> None:
    with pytest.raises(UnsupportedTokenizer, match="uroman"):
        CharTokenizer.from_sidecar({"vocab": {"a": 1}, "is_uroman": True})


def test_an_engine_needs_a_vocabulary() -> None:
    with pytest.raises(UnsupportedTokenizer, match="vocab"):
        CharTokenizer.from_sidecar({"sample_rate": 16000})


def test_without_normalization_unknown_characters_are_unk() -> None:
    tokenizer = CharTokenizer(vocab={"<unk>": 3, "a": 5}, add_blank=False, lowercase=False)
    assert tokenizer.ids("aXa") == [5, 3, 5]


def test_chunks_split_sentences_and_long_runs() -> None:
    assert chunks("One. Two! Three?") == ["One.", "Two!", "Three?"]
    long = " ".join(["word"] * 200)
    pieces = chunks(long, limit=50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == long


def test_measurement_without_a_vocabulary_uses_ids_of_the_text() -> None:
    tokenizer = CharTokenizer(vocab_size=40)
    assert tokenizer.ids("abc") == tokenizer.ids("abc")
    assert tokenizer.ids("abc") != tokenizer.ids("abd")
    assert all(1 <= i < 40 for i in tokenizer.ids("some text"))


@pytest.mark.slow
def test_renders_what_the_graph_computes(tiny_optimized: Path) -> None:
    engine = engine_for(tiny_optimized)
    audio = np.concatenate(list(engine.stream(TEXT, "tiny", 1.0, 0)))
    variant = exported.select(exported.load(tiny_optimized), "cpu")
    session = ort.InferenceSession(str(variant.path), providers=["CPUExecutionProvider"])
    expected = [
        session.run(None, vits_feeds(np.array([tokenizer_of(tiny_optimized).ids(c)]), 1.0))[0]
        for c in chunks(TEXT)
    ]
    # (thread counts differ, so float sums may round differently)
    np.testing.assert_allclose(
        audio, np.clip(np.concatenate(expected, axis=None), -1, 1), atol=1e-5
    )
    assert engine.sample_rate == 16000


@pytest.mark.slow
def test_renders_deterministically_and_slower_at_half_speed(tiny_optimized: Path) -> None:
    engine = engine_for(tiny_optimized)
    once = np.concatenate(list(engine.stream(TEXT, "tiny", 1.0, 0)))
    again = np.concatenate(list(engine.stream(TEXT, "tiny", 1.0, 99)))
    slow = np.concatenate(list(engine.stream(TEXT, "tiny", 0.5, 0)))
    assert np.array_equal(once, again)
    assert len(slow) > 1.8 * len(once)


@pytest.mark.slow
def test_a_vits_export_defines_a_voice(tiny_optimized: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, synth=SynthSettings(exports={"tiny": str(tiny_optimized)}))
    voice = for_config(config)["tiny"]
    variant = exported.select(exported.load(tiny_optimized), "cpu")
    assert voice.engine == "vits"
    assert voice.model_id == f"vits-tiny.{variant.name}@{variant.sha256}"


@pytest.mark.slow
async def test_the_edge_serves_the_exported_voice(
    aiohttp_client: AiohttpClient, tiny_optimized: Path, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        synth=SynthSettings(workers=1, voices=("tiny",), exports={"tiny": str(tiny_optimized)}),
    )
    client, audio, rate = await render_through_node(aiohttp_client, config, "tiny", TEXT)
    assert rate == 16000 and len(audio) > 0
    assert await metric(client, "nearvoice_synth_total", engine="vits") == 1.0


def test_an_exported_vits_voice_fits_durations_or_refuses_a_length_it_cannot_hit(
    tiny_optimized: Path,
) -> None:
    """The tiny random model's durations jump (every token its minimum frames until the
    scale doubles them), so 1.0x fits exactly and 1.4x has no speed within tolerance: the
    fit refuses rather than render a wrong length."""
    from nearvoice.edge.synth import fit

    engine = engine_for(tiny_optimized)
    assert "duration" in engine.controls
    natural = engine.samples(TEXT, "tiny", 1.0)
    assert natural is not None
    exact = fit.fit(engine, TEXT, "tiny", round(natural / engine.sample_rate, 2))
    assert sum(len(a) for a in engine.stream(TEXT, "tiny", exact.speed, 0)) == exact.samples
    with pytest.raises(fit.CannotFit):
        fit.fit(engine, TEXT, "tiny", round(natural / engine.sample_rate * 1.4, 2))
