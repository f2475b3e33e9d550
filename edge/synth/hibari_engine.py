"""hibari: a 7.9 MB int8 ONNX distillation of Kokoro-82M, from the hibari-tts package."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nearvoice.edge.synth import capability, hints
from nearvoice.edge.synth.chunking import split_chunks
from nearvoice.edge.synth.durations import Counted, DurationGraph, Durations, Feeds
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.providers import session, short_name
from nearvoice.edge.synth.runs import Runs, Table

if TYPE_CHECKING:
    from nearvoice.edge.spec import Spec
    from nearvoice.edge.synth.exported import Chosen

ENGINE_NAME = "hibari"
SAMPLES_PER_FRAME = 600
"""Samples per duration frame: hibari's durations count 25 ms frames, its network
outputs two 12.5 ms spectra per frame, and `hibari.dsp` turns each spectrum into HOP
(300) samples at 24 kHz."""
MIN_IDS = 3
"""`Hibari.from_ids` renders nothing (an empty array) for fewer ids: the two pads and no
phoneme."""

CONTROLS = frozenset(("duration", "lang", hints.IPA))
"""hibari fits durations through its duration pass and says IPA hints through its phoneme
input (misaki's alphabet); emotion, reference voices and pinyin need an external engine."""
LANGUAGES = ("en-US",)
"""The bundled voice speaks American English (`heart`)."""
MAX_PHONEMES = 400
"""As hibari's own: a piece longer than this is split at clause punctuation."""

"""A text's model inputs: the phoneme ids of each piece the model renders at once."""


def bundled_voices() -> dict[str, dict[str, Any]]:
    """Voices whose model ships inside the package; the others would need a download."""
    from hibari.voices import VOICES

    return {name: info for name, info in VOICES.items() if info.get("bundled")}


@functools.cache
def hibari_vocab() -> frozenset[str]:
    """The phonemes hibari's model takes (its package's vocab.json), read without a model."""
    from importlib.resources import files

    text = files("hibari").joinpath("assets", "vocab.json").read_text(encoding="utf-8")
    return frozenset(json.loads(text))


def check_ipa(text: str) -> None:
    """Raises hints.Unmappable for an IPA hint in `text` hibari cannot say."""
    hints.check_ipa(text, hibari_vocab(), espeak=False, engine=ENGINE_NAME)


def hibari_model_id(voice: str) -> str:
    info = bundled_voices()[voice]
    return f"hibari-{voice}@{info['sha256']}"


class HibariEngine:
    """One hibari model per voice and per worker thread.

    onnxruntime sessions are thread-safe, but hibari's G2P keeps per-call state, so each
    inference thread gets its own instance; each uses `threads` onnxruntime threads, and
    the owner sizes the pool so that threads times workers does not oversubscribe cores.

    The duration pass (`samples`) runs the graph's text side; on the CPU a render after it
    runs only the rest of the graph on what the pass handed off, then `hibari.dsp`, the
    same samples as `Hibari.from_ids` (warmup checks it, else renders run the whole graph).
    """

    name = ENGINE_NAME
    sample_rate = 24000
    controls = CONTROLS
    frame_samples = SAMPLES_PER_FRAME

    def __init__(
        self,
        voices: tuple[str, ...] = ("heart",),
        threads: int = 1,
        providers: list[Any] | None = None,
        exported: Mapping[str, Chosen] | None = None,
    ) -> None:
        known = bundled_voices()
        missing = [v for v in voices if v not in known]
        if missing:
            raise ValueError(f"hibari voices not bundled in the package: {missing}")
        self.voices = voices
        self._exported = {v: c for v, c in (exported or {}).items() if v in voices}
        """Voices that render an exported variant instead of the packaged model."""
        self._threads = threads
        self._providers = providers or ["CPUExecutionProvider"]
        self._local = threading.local()
        self._durations = {v: self._duration_pass(v) for v in voices}
        self._runs: Table[tuple[str, str, float], Runs[list[int], Counted | None]] = Table()
        """The last texts' pieces and their passes' runs, shared by the pass and the render."""

    def _model_providers(self, voice: str) -> list[Any]:
        chosen = self._exported.get(voice)
        return chosen.providers(self._providers) if chosen else self._providers

    def _duration_pass(self, voice: str) -> Durations:
        from hibari.voices import voice_path

        chosen = self._exported.get(voice)
        path = chosen.variant.path if chosen else Path(voice_path(voice))
        providers = self._model_providers(voice)
        split = providers == ["CPUExecutionProvider"]
        return Durations(path, self._threads, providers, _per_frame, split)

    def _model(self, voice: str) -> Any:
        models: dict[str, Any] | None = getattr(self._local, "models", None)
        if models is None:
            models = self._local.models = {}
        model = models.get(voice)
        if model is None:
            from hibari import Hibari

            chosen = self._exported.get(voice)
            path = str(chosen.variant.path) if chosen else None
            model = models[voice] = Hibari(voice=voice, model=path, threads=self._threads)
            if self._providers != ["CPUExecutionProvider"]:
                # hibari builds a CPU-only session; rebuild it on the chosen providers
                # (its public `sess` attribute is what it runs).
                providers = self._model_providers(voice)
                model.sess = session(model.model_path, self._threads, providers)
        return model

    @property
    def provider(self) -> str:
        """The execution provider this engine's sessions run on (the first that loaded)."""
        return short_name(self._model(self.voices[0]).sess.get_providers()[0])

    def model_id(self, voice: str) -> str:
        chosen = self._exported.get(voice)
        return chosen.model_id if chosen else hibari_model_id(voice)

    def refuses(self, spec: Spec) -> str | None:
        return capability.refused(spec, self.controls, LANGUAGES, check_ipa)

    def warmup(self) -> None:
        for voice in self.voices:
            durations = self._durations[voice]
            durations.prepare()
            counted = self.samples(WARM_UP, voice, 1.0)
            audio = list(self.stream(WARM_UP, voice, 1.0, 0))
            model, rng = self._model(voice), np.random.default_rng(0)
            whole = [model.from_ids(ids, 1.0, rng) for ids in self._pieces(voice, WARM_UP)]
            durations.check(counted, sum(len(a) for a in whole))
            if durations.splits() and not _same(audio, whole):
                durations.no_split("the rest after the pass renders other samples")

    def _pieces(self, voice: str, text: str) -> Iterator[list[int]]:
        """The ids of each piece `stream` renders, chunk by chunk: hibari's own sentence
        split and MAX_PHONEMES clause split inside each of nearvoice's chunks. Lazy, so
        a render that did not run the duration pass starts on its first chunk at once."""
        model = self._model(voice)
        for chunk in split_chunks(text):
            parts: list[hints.Part] = hints.parse(chunk) if "[" in chunk else [chunk]
            if not any(isinstance(p, hints.Hint) for p in parts):
                for phonemes in model.phonemize(chunk):
                    yield model.ids(phonemes)
                continue
            for phonemes in _split(_hinted(model, parts)):
                yield model.ids(phonemes)

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        # hibari.Hibari.stream, over nearvoice's chunks instead of hibari's sentences: one
        # noise generator for the whole text, as hibari keeps it.
        model = self._model(voice)
        durations = self._durations[voice]
        rng = np.random.default_rng(seed)
        runs = self._text_runs(voice, text, speed)
        for i, ids in enumerate(runs):
            if len(ids) >= MIN_IDS and durations.splits():
                feeds = _feeds(ids, speed)
                run = runs.run(i, functools.partial(durations.count, feeds))
                if run is not None:
                    # Hibari.from_ids, with the graph run as the pass and the rest
                    from hibari import dsp

                    lh, th, ln, lr, phi, f0 = (o[0] for o in durations.rest(run, feeds))
                    yield dsp.synth(lh, th, ln, lr, phi, f0, rng)
                    continue
            yield model.from_ids(ids, speed, rng)

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        durations = self._durations.get(voice)
        if durations is None:
            raise ValueError(f"voice {voice!r} is not one of this engine's {self.voices}")
        if durations.graph() is None or durations.broken is not None:
            return None  # (runs counted before a pass was disabled are not lengths)
        runs = self._text_runs(voice, text, speed)
        total = 0
        # From the last piece back: a render beside this pass counts from the first.
        for i, ids in reversed(list(enumerate(runs.pieces()))):
            if len(ids) < MIN_IDS:
                continue  # renders nothing
            run = runs.run(i, functools.partial(durations.count, _feeds(ids, speed)))
            if run is None:
                return None
            total += run.samples
        return total

    def help_count(self, text: str, voice: str, speed: float) -> None:
        durations = self._durations.get(voice)
        if durations is None or durations.graph() is None or durations.broken is not None:
            return
        runs = self._text_runs(voice, text, speed)
        for i, ids in enumerate(runs):
            if len(ids) >= MIN_IDS:
                runs.claim(i, functools.partial(durations.count, _feeds(ids, speed)))

    def _text_runs(self, voice: str, text: str, speed: float) -> Runs[list[int], Counted | None]:
        """The pieces of `text` and their passes' runs, shared by the pass and the render
        (edge.synth.runs)."""
        return self._runs.get((voice, text, speed), lambda: Runs(self._pieces(voice, text)))


WARM_UP = "Warm up."


def _feeds(ids: list[int], speed: float) -> Feeds:
    """The graph's inputs for one piece, as `Hibari.from_ids` makes them."""
    return {"ids": np.asarray([ids], np.int64), "speed": np.asarray([speed], np.float32)}


def _same(one: list[Audio], other: list[Audio]) -> bool:
    return len(one) == len(other) and all(
        np.array_equal(a, b) for a, b in zip(one, other, strict=False)
    )


def _hinted(model: Any, parts: list[hints.Part]) -> str:
    """A chunk's phonemes with its IPA hints in place: the plain runs through hibari's G2P,
    each hint's IPA mapped to misaki's alphabet."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, hints.Hint):
            out.append(hints.to_misaki(part.value, model.vocab, ENGINE_NAME))
        elif part.strip():
            phonemes = model.g2p(part.strip())
            if phonemes:
                out.append(phonemes)
    return " ".join(out)


def _split(phonemes: str) -> list[str]:
    """Pieces of at most MAX_PHONEMES, cut after clause punctuation as hibari cuts them."""
    if len(phonemes) <= MAX_PHONEMES:
        return [phonemes] if phonemes else []
    pieces: list[str] = []
    current = ""
    for word in phonemes.split(" "):
        if current and len(current) + len(word) + 1 > MAX_PHONEMES and current[-1] in ",;:—.!?":
            pieces.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        pieces.append(current)
    return pieces


def _per_frame(graph: DurationGraph) -> int:
    return SAMPLES_PER_FRAME
