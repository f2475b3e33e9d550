"""The voice catalog: which engine renders each voice and the model identity that goes
into its specs (DESIGN.md sections 2 and 6). Signing and verifying both resolve voices
here, without loading any model: hibari's ids come from its package metadata, piper's
from a hash of the installed .onnx file, computed once per process."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from edge.synth.hibari_engine import ENGINE_NAME as HIBARI
from edge.synth.hibari_engine import hibari_model_id
from edge.synth.piper_engine import ENGINE_NAME as PIPER
from edge.synth.piper_engine import piper_model_id

if TYPE_CHECKING:
    from edge.config import ExternalSettings


@dataclass(frozen=True, slots=True)
class Voice:
    name: str
    engine: str
    model_id: str


@functools.cache
def catalog() -> Mapping[str, Voice]:
    """Every voice of the default install (read-only; built once per process)."""
    voices = [
        Voice("heart", HIBARI, hibari_model_id("heart")),
        Voice("joe", PIPER, piper_model_id("joe")),
    ]
    return MappingProxyType({v.name: v for v in voices})


class UnknownVoice(KeyError):
    def __init__(self, voice: str, known: list[str]) -> None:
        super().__init__(voice)
        self.voice = voice
        self.known = known


def with_external(external: Iterable[ExternalSettings]) -> Mapping[str, Voice]:
    """The catalog plus the voices of configured external servers."""
    voices = dict(catalog())
    for server in external:
        for voice in server.voices:
            if voice.name in voices:
                raise ValueError(f"voice {voice.name!r} is defined twice")
            voices[voice.name] = Voice(voice.name, server.name, voice.model_id)
    return MappingProxyType(voices)


def resolve(voice: str, voices: Mapping[str, Voice] | None = None) -> Voice:
    voices = catalog() if voices is None else voices
    found = voices.get(voice)
    if found is None:
        raise UnknownVoice(voice, sorted(voices))
    return found
