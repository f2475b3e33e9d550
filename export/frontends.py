"""What turns text into a model's inputs and its outputs into audio, per model family.

A variant is only comparable to its source if both see the very same inputs, so every
measurement encodes each sentence once, with the source model's own text front end, and
feeds the same arrays to every variant. The family is recognised from the graph's input
names; anything else is an unsupported architecture, reported as such.

- piper: `input`, `input_lengths`, `scales` (VITS; espeak-ng phonemes, piper's voice JSON).
- hibari: `ids`, `speed` (Kokoro distilled; spectral outputs rendered by hibari's DSP).
- vits: `input_ids`, `attention_mask`, `length_scale` (what `from-transformers` writes, with
  `vits.json` beside it).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.piper_engine import phonemize
from nearvoice.edge.synth.vits_engine import VITS_SIDECAR, vits_feeds
from nearvoice.edge.synth.vits_text import CharTokenizer, UnsupportedTokenizer, chunks
from nearvoice.export.errors import CorruptModel, ModelNotFound, UnsupportedArchitecture

Feeds = dict[str, npt.NDArray[Any]]

PIPER_INPUTS = frozenset({"input", "input_lengths", "scales"})
HIBARI_INPUTS = frozenset({"ids", "speed"})
VITS_INPUTS = frozenset({"input_ids", "attention_mask", "length_scale"})


@dataclass
class Frontend(abc.ABC):
    """A model family's text front end and audio back end."""

    family: str
    sample_rate: int
    sidecars: dict[str, Path] = field(default_factory=dict)
    """Files the engine needs beside the model: name in the export dir -> source path."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[Feeds]:
        """The model's inputs for `text`: one dict per chunk the model sees at once."""

    def decode(self, outputs: Sequence[npt.NDArray[Any]], chunk: int) -> Audio:
        """Audio from one chunk's outputs; `chunk` seeds any host-side noise."""
        audio = np.asarray(outputs[0], dtype=np.float32).reshape(-1)
        return audio


@dataclass
class PiperFrontend(Frontend):
    """piper voices: noise scales 0, as the engines render them (deterministic)."""

    config: dict[str, Any] = field(default_factory=dict)
    _voice: Any = None

    def encode(self, text: str) -> list[Feeds]:
        if self._voice is None:
            from piper import PiperConfig, PiperVoice

            self._voice = PiperVoice(session=None, config=PiperConfig.from_dict(self.config))
        voice = self._voice
        scales = np.array([0.0, voice.config.length_scale, 0.0], dtype=np.float32)
        feeds: list[Feeds] = []
        for phonemes in phonemize(voice, text):
            ids = np.array([voice.phonemes_to_ids(phonemes)], dtype=np.int64)
            feed: Feeds = {
                "input": ids,
                "input_lengths": np.array([ids.shape[1]], dtype=np.int64),
                "scales": scales,
            }
            if voice.config.num_speakers > 1:
                feed["sid"] = np.array([voice.config.default_speaker_id or 0], dtype=np.int64)
            feeds.append(feed)
        return feeds


@dataclass
class HibariFrontend(Frontend):
    """hibari: G2P and vocabulary from the package; the DSP back end with a seeded noise."""

    _tts: Any = None

    def encode(self, text: str) -> list[Feeds]:
        if self._tts is None:
            from hibari import Hibari

            # Used for its G2P and vocabulary only; the session is the variant's.
            self._tts = Hibari(voice="heart")
        tts = self._tts
        speed = np.array([1.0], dtype=np.float32)
        return [
            {"ids": np.array([tts.ids(ps)], dtype=np.int64), "speed": speed}
            for ps in tts.phonemize(text)
        ]

    def decode(self, outputs: Sequence[npt.NDArray[Any]], chunk: int) -> Audio:
        from hibari import dsp

        lh, th, ln, lr, phi, f0 = (np.asarray(o[0]) for o in outputs)
        audio: Audio = dsp.synth(lh, th, ln, lr, phi, f0, np.random.default_rng(chunk))
        return audio


@dataclass
class VitsFrontend(Frontend):
    """Character-level VITS (MMS-style) as `from-transformers` exports it, tokenized as
    the edge's engine does it (edge.synth.vits_text)."""

    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)

    def encode(self, text: str) -> list[Feeds]:
        feeds: list[Feeds] = []
        for chunk in chunks(text):
            ids = np.array([self.tokenizer.ids(chunk)], dtype=np.int64)
            if ids.shape[1]:
                feeds.append(vits_feeds(ids, 1.0))
        return feeds


def _input_names(model: Path) -> frozenset[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise CorruptModel(f"{model} is not a loadable ONNX model: {exc}") from exc
    return frozenset(i.name for i in session.get_inputs())


def _single_file(model: Path) -> None:
    """Variants are single files (hashed, copied and loaded as one); weights kept in
    external data files are refused up front rather than lost in a copy."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors
        raise CorruptModel(f"{model} is not an ONNX model: {exc}") from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise CorruptModel(
            f"{model} keeps its weights in external data files; save it as one file "
            "(onnx.save(onnx.load(path), path, save_as_external_data=False))"
        )


def _json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelNotFound(f"{what} {path} does not exist") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModel(f"{what} {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptModel(f"{what} {path} is not a JSON object")
    return data


def detect(model: Path, config: Path | None = None) -> Frontend:
    """The front end for the ONNX model at `model`; `config` is a piper voice JSON (default:
    `<model>.json`) or a `vits.json` (default: beside the model)."""
    if not model.is_file():
        raise ModelNotFound(f"model {model} does not exist")
    _single_file(model)
    names = _input_names(model)
    if names >= PIPER_INPUTS:
        path = config or model.with_name(model.name + ".json")
        data = _json(path, "piper voice config")
        try:
            rate = int(data["audio"]["sample_rate"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptModel(f"{path} has no audio.sample_rate") from exc
        return PiperFrontend("piper", rate, {"model.onnx.json": path}, config=data)
    if names >= HIBARI_INPUTS:
        from hibari import SAMPLE_RATE

        return HibariFrontend("hibari", int(SAMPLE_RATE))
    if names >= VITS_INPUTS:
        path = config or model.with_name(VITS_SIDECAR)
        data = _json(path, "vits config")
        try:
            tokenizer = CharTokenizer.from_sidecar(data, require_vocab=False)
            rate = int(data["sample_rate"])
        except UnsupportedTokenizer as exc:
            raise UnsupportedArchitecture(f"{path}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptModel(f"{path} is malformed: {exc!r}") from exc
        return VitsFrontend("vits", rate, {VITS_SIDECAR: path}, tokenizer=tokenizer)
    raise UnsupportedArchitecture(
        f"{model}: inputs {sorted(names)} match no supported TTS family "
        f"(piper {sorted(PIPER_INPUTS)}, hibari {sorted(HIBARI_INPUTS)}, "
        f"vits {sorted(VITS_INPUTS)})"
    )
