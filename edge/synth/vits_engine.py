"""vits: character-level VITS voices (MMS-style transformers checkpoints) that
`nearvoice export from-transformers` and `optimize` turned into an export directory.

The voice is defined by its export: `[synth.exports] name = "dir"` with a directory whose
family is "vits" adds the voice `name`, rendered from the variant the node selects. The
graph's noise is fixed at 0 when exporting, so renders are deterministic and `seed` has
nothing to seed (docs/contracts.md#spec-and-key).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from nearvoice.edge.synth import capability
from nearvoice.edge.synth.chunking import split_chunks
from nearvoice.edge.synth.durations import DurationGraph, Durations, Recent
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.exported import ExportDirError
from nearvoice.edge.synth.providers import session, short_name
from nearvoice.edge.synth.vits_text import CharTokenizer, UnsupportedTokenizer, chunks

if TYPE_CHECKING:
    from nearvoice.edge.spec import Spec
    from nearvoice.edge.synth.exported import Chosen

ENGINE_NAME = "vits"
FAMILY = "vits"
CONTROLS = frozenset(("duration",))
"""Durations fit through the exported graph's duration pass; a character-level vocabulary
takes no phoneme hints."""
VITS_SIDECAR = "vits.json"
"""Beside a `from-transformers` model: its sample rate and character vocabulary."""


def vits_feeds(ids: npt.NDArray[np.int64], length_scale: float) -> dict[str, npt.NDArray[Any]]:
    """The graph's inputs for one chunk of token ids, [1, tokens]."""
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "length_scale": np.array([length_scale], dtype=np.float32),
    }


def vits_model_id(voice: str, chosen: Chosen) -> str:
    return f"vits-{voice}.{chosen.variant.name}@{chosen.variant.sha256}"


class VitsEngine:
    """One exported voice; one onnxruntime session per worker thread, as the other
    engines keep theirs."""

    name = ENGINE_NAME
    controls = CONTROLS

    def __init__(self, chosen: Chosen, threads: int = 1, providers: list[Any] | None = None):
        if chosen.export.family != FAMILY:
            raise ExportDirError(f"{chosen.export.path} is a {chosen.export.family} export")
        path = chosen.sidecar(VITS_SIDECAR)
        try:
            self._tokenizer = CharTokenizer.from_sidecar(
                json.loads(path.read_text(encoding="utf-8"))
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, UnsupportedTokenizer) as exc:
            raise ExportDirError(f"voice {chosen.voice}: {path}: {exc}") from exc
        self._chosen = chosen
        self.voices: tuple[str, ...] = (chosen.voice,)
        self.sample_rate: int = chosen.export.sample_rate
        self._threads = threads
        self._providers = providers or ["CPUExecutionProvider"]
        self._local = threading.local()
        self._durations = Durations(
            chosen.variant.path, threads, chosen.providers(self._providers), _per_frame
        )
        self._recent: Recent[str, list[npt.NDArray[np.int64]]] = Recent()

    def session(self) -> Any:
        loaded = getattr(self._local, "session", None)
        if loaded is None:
            chosen = self._chosen
            providers = chosen.providers(self._providers)
            loaded = self._local.session = session(chosen.variant.path, self._threads, providers)
        return loaded

    def _pieces(self, text: str) -> Iterator[npt.NDArray[np.int64]]:
        """The token ids of each piece `stream` renders, [1, tokens], chunk by chunk;
        pieces with nothing the vocabulary can say are left out. Lazy, so a render that
        did not run the duration pass starts on its first chunk at once."""
        for chunk in (piece for part in split_chunks(text) for piece in chunks(part)):
            ids = np.array([self._tokenizer.ids(chunk)], dtype=np.int64)
            if ids.shape[1]:
                yield ids

    def _check(self, voice: str, speed: float) -> None:
        if voice not in self.voices:
            raise ValueError(f"voice {voice!r} is not one of this engine's {self.voices}")
        if not speed > 0:
            raise ValueError(f"speed must be positive, not {speed}")

    @property
    def provider(self) -> str:
        return short_name(self.session().get_providers()[0])

    def model_id(self, voice: str) -> str:
        return self._chosen.model_id

    def refuses(self, spec: Spec) -> str | None:
        return capability.refused(spec, self.controls)

    @property
    def frame_samples(self) -> int:
        """Samples per duration frame: the vocoder's upsampling (1 without a pass)."""
        graph = self._durations.graph()
        return graph.upsampling if graph is not None else 1

    def warmup(self) -> None:
        voice = self.voices[0]
        counted = self.samples("Warm up.", voice, 1.0)
        self._durations.check(counted, sum(len(a) for a in self.stream("Warm up.", voice, 1.0, 0)))

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        self._check(voice, speed)
        session = self.session()
        pieces = self._recent.get(text)
        for ids in self._pieces(text) if pieces is None else pieces:
            out = session.run(None, vits_feeds(ids, 1.0 / speed))[0]
            audio: Audio = np.clip(np.asarray(out, dtype=np.float32).reshape(-1), -1.0, 1.0)
            yield audio

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        self._check(voice, speed)
        if self._durations.graph() is None:
            return None
        pieces = self._recent.get(text)
        if pieces is None:
            pieces = self._recent.put(text, list(self._pieces(text)))
        total = 0
        for ids in pieces:
            count = self._durations.samples(vits_feeds(ids, 1.0 / speed))
            if count is None:
                return None
            total += count
        return total


def _per_frame(graph: DurationGraph) -> int:
    """A VITS vocoder's samples per frame: the product of its upsampling rates."""
    if graph.upsampling < 2:
        raise ValueError("no upsampling layers (ConvTranspose) found after the durations")
    return graph.upsampling
