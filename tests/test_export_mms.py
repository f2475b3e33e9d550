"""from-transformers on a checkpoint of MMS size and shape: transformers' default
`VitsConfig` (every facebook/mms-tts-* model's architecture, with the stochastic duration
predictor's spline flows) with random weights and the tokenizer files those checkpoints
ship. Exported once per session (about 40 s on two cores); each test checks one thing
on that export: its audio against torch's, its tokenizer against transformers', and the
edge's engine serving it."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nearvoice.edge.synth import exported
from nearvoice.edge.synth.chunking import split_chunks
from nearvoice.edge.synth.vits_engine import VitsEngine, vits_feeds
from nearvoice.export.from_transformers import MODEL_FILE, RECORD_FILE
from nearvoice.export.frontends import VitsFrontend, detect
from nearvoice.export.sentences import SENTENCES

pytestmark = pytest.mark.slow

SAID = (SENTENCES[0], SENTENCES[1], SENTENCES[8])
"""Short, long, and in two clauses (which the engine renders one by one). None has the
letter "k", MMS's pad token: transformers' VitsTokenizer splits its input at special
tokens, so it leaves out the blanks beside a "k" that the edge's tokenizer (like the
original MMS text mapper) keeps; elsewhere the two agree."""
Render = Callable[..., np.ndarray]
STRUCTURE = (
    "use_stochastic_duration_prediction",
    "duration_predictor_num_flows",
    "duration_predictor_flow_bins",
    "prior_encoder_num_flows",
    "num_hidden_layers",
    "hidden_size",
    "upsample_rates",
    "vocab_size",
)


@pytest.fixture(scope="module")
def torch_model(mms_checkpoint: Path) -> Any:
    from transformers import VitsModel

    model = VitsModel.from_pretrained(str(mms_checkpoint)).eval()
    model.noise_scale = 0.0
    model.noise_scale_duration = 0.0
    return model


@pytest.fixture(scope="module")
def torch_audio(torch_model: Any) -> Render:
    """The torch model's waveform for some ids, at a length scale, each computed once."""

    @functools.cache
    def render(ids: tuple[int, ...], length_scale: float) -> np.ndarray:
        with torch.no_grad():
            out = torch_model(input_ids=torch.tensor([ids]), speaking_rate=1.0 / length_scale)
        return np.asarray(out.waveform.numpy()[0])

    return lambda ids, length_scale=1.0: render(tuple(ids), length_scale)


@pytest.fixture(scope="module")
def tokenizer(mms_checkpoint: Path) -> Any:
    from transformers import VitsTokenizer

    return VitsTokenizer.from_pretrained(str(mms_checkpoint))


@pytest.fixture(scope="module")
def engine(mms_voice: Path) -> Iterator[VitsEngine]:
    export = exported.load(mms_voice)
    variant = next(v for v in export.variants if v.name == "fp32")
    engine = VitsEngine(exported.Chosen("mms", export, variant, "cpu", "vits-mms.fp32@x"))
    engine.warmup()
    yield engine


def test_the_checkpoint_has_the_default_architecture(mms_checkpoint: Path) -> None:
    from transformers import VitsConfig

    saved = json.loads((mms_checkpoint / "config.json").read_text())
    defaults = VitsConfig().to_dict()
    assert {k: saved[k] for k in STRUCTURE} == {k: defaults[k] for k in STRUCTURE}
    assert saved["duration_predictor_num_flows"] >= 2  # what the spline swap is for


def test_a_default_config_checkpoint_exports_within_parity(mms_export: Path) -> None:
    record = json.loads((mms_export / RECORD_FILE).read_text())
    assert record["parameters"] > 30_000_000
    checks = record["parity"]["checks"]
    assert checks and all(c["samples"] > 0 for c in checks)
    assert all(c["max_abs_diff"] <= record["parity"]["max_abs_diff_allowed"] for c in checks)


def test_the_edge_tokenizer_reads_the_shipped_tokenizer_files(
    mms_export: Path, tokenizer: Any
) -> None:
    frontend = detect(mms_export / MODEL_FILE)
    assert isinstance(frontend, VitsFrontend)
    for text in (*SAID, "Numbers 1, 2 and 3; CAPITALS and #symbols!"):
        assert frontend.tokenizer.ids(text) == tokenizer(text).input_ids, text


def test_onnx_renders_what_torch_renders(
    mms_export: Path, torch_audio: Render, tokenizer: Any
) -> None:
    session = ort.InferenceSession(str(mms_export / MODEL_FILE), providers=["CPUExecutionProvider"])
    per_token = set()
    for text, length_scale in [*((t, 1.0) for t in SAID), (SAID[0], 1.6)]:
        ids = tokenizer(text).input_ids
        expected = torch_audio(ids, length_scale)
        feeds = vits_feeds(np.array([ids], dtype=np.int64), length_scale)
        got = np.asarray(session.run(None, feeds)[0])[0]
        assert got.shape == expected.shape, text  # the exact length, not close to it
        assert np.abs(expected).max() > 1e-3  # random weights still make a signal
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=text)
        per_token.add(got.shape[0] / len(ids))
    assert len(per_token) > 2  # durations depend on the text and the length scale


def test_the_engine_serves_the_export(
    engine: VitsEngine, torch_audio: Render, tokenizer: Any
) -> None:
    for text in SAID:
        audio = np.concatenate(list(engine.stream(text, "mms", 1.0, 0)))
        # The engine renders a sentence clause by clause (edge.synth.chunking).
        pieces = [torch_audio(tokenizer(c).input_ids) for c in split_chunks(text)]
        expected = np.clip(np.concatenate(pieces), -1.0, 1.0)
        assert audio.shape == expected.shape, text
        np.testing.assert_allclose(audio, expected, atol=1e-4, err_msg=text)
        assert engine.samples(text, "mms", 1.0) == len(audio)
