"""The interface every TTS engine implements."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from nearvoice.edge.spec import Spec

Audio = npt.NDArray[np.float32]


class Engine(Protocol):
    name: str
    sample_rate: int
    """Hz of the float32 mono audio `stream` yields."""
    voices: tuple[str, ...]
    controls: frozenset[str]
    """The optional spec controls (edge.spec.CONTROLS) this engine honours."""

    def refuses(self, spec: Spec) -> str | None:
        """The first control of `spec` this engine does not honour (edge.synth.capability),
        None when it renders the spec as asked."""
        ...

    def model_id(self, voice: str) -> str:
        """`name@sha256` of the model file that renders `voice`."""
        ...

    def warmup(self) -> None:
        """Loads everything lazily loaded, so the first real render is fast."""
        ...

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        """Renders `text` chunk by chunk (`edge.synth.chunking.split_chunks`, so the first
        audio comes from the first phrase), yielding each chunk's audio as soon as it is
        ready. The same arguments always give the same samples."""
        ...

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        """The duration pass: exactly how many samples `stream` will yield for these
        arguments, computed without rendering audio; None when this engine cannot know
        (an external server). `seed` changes no length, so it is not an argument."""
        ...


@runtime_checkable
class HelpsCount(Protocol):
    """An engine whose duration pass shares its work piece by piece with the render of the
    same text (edge.synth.runs), so a render waiting for the length can count too."""

    def help_count(self, text: str, voice: str, speed: float) -> None:
        """Counts, first to last, the pieces of `text` that no thread has begun counting,
        as `samples` would count them; skips the others without waiting for them."""
        ...


@runtime_checkable
class SpecEngine(Protocol):
    """An engine that takes the whole spec and applies its controls itself (emotion, a
    reference voice, a target duration): an external server does the work, so the node
    neither fits durations nor knows the length in advance."""

    def stream_spec(self, spec: Spec) -> Iterator[Audio]:
        """Renders `spec` as `Engine.stream` renders its text, voice, speed and seed."""
        ...
