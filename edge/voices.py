"""The voice catalog: which engine renders each voice and the model identity that goes
into its specs (DESIGN.md sections 2 and 6). Signing and verifying both resolve voices
here, without loading any model."""

from __future__ import annotations

from dataclasses import dataclass

from edge.synth.hibari_engine import ENGINE_NAME as HIBARI
from edge.synth.hibari_engine import hibari_model_id


@dataclass(frozen=True, slots=True)
class Voice:
    name: str
    engine: str
    model_id: str


def catalog() -> dict[str, Voice]:
    return {"heart": Voice("heart", HIBARI, hibari_model_id("heart"))}


class UnknownVoice(KeyError):
    def __init__(self, voice: str, known: list[str]) -> None:
        super().__init__(voice)
        self.voice = voice
        self.known = known


def resolve(voice: str) -> Voice:
    voices = catalog()
    found = voices.get(voice)
    if found is None:
        raise UnknownVoice(voice, sorted(voices))
    return found
