"""vits: character-level VITS voices (MMS-style transformers checkpoints) that
`nearvoice export from-transformers` and `optimize` turned into an export directory.

The voice is defined by its export: `[synth.exports] name = "dir"` with a directory whose
family is "vits" adds the voice `name`, rendered from the variant the node selects. The
graph's noise is fixed at 0 when exporting, so renders are deterministic and `seed` has
nothing to seed (DESIGN.md section 2).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge.synth.chunking import split_chunks
from edge.synth.engine import Audio
from edge.synth.exported import ExportDirError
from edge.synth.providers import session, short_name
from edge.synth.vits_text import CharTokenizer, UnsupportedTokenizer, chunks

if TYPE_CHECKING:
    from edge.synth.exported import Chosen

ENGINE_NAME = "vits"
FAMILY = "vits"
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

    def session(self) -> Any:
        loaded = getattr(self._local, "session", None)
        if loaded is None:
            chosen = self._chosen
            providers = chosen.providers(self._providers)
            loaded = self._local.session = session(chosen.variant.path, self._threads, providers)
        return loaded

    @property
    def provider(self) -> str:
        return short_name(self.session().get_providers()[0])

    def model_id(self, voice: str) -> str:
        return self._chosen.model_id

    def warmup(self) -> None:
        for _ in self.stream("Warm up.", self.voices[0], 1.0, 0):
            pass

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        if voice not in self.voices:
            raise ValueError(f"voice {voice!r} is not one of this engine's {self.voices}")
        if not speed > 0:
            raise ValueError(f"speed must be positive, not {speed}")
        session = self.session()
        for chunk in (piece for part in split_chunks(text) for piece in chunks(part)):
            ids = np.array([self._tokenizer.ids(chunk)], dtype=np.int64)
            if ids.shape[1] == 0:
                continue  # nothing the vocabulary can say
            out = session.run(None, vits_feeds(ids, 1.0 / speed))[0]
            audio: Audio = np.clip(np.asarray(out, dtype=np.float32).reshape(-1), -1.0, 1.0)
            yield audio

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        return None
