"""The interface every TTS engine implements."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt

Audio = npt.NDArray[np.float32]


class Engine(Protocol):
    name: str
    sample_rate: int
    """Hz of the float32 mono audio `stream` yields."""
    voices: tuple[str, ...]

    def model_id(self, voice: str) -> str:
        """`name@sha256` of the model file that renders `voice`."""
        ...

    def warmup(self) -> None:
        """Loads everything lazily loaded, so the first real render is fast."""
        ...

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        """Renders `text`, yielding one array per sentence as soon as it is ready.
        The same arguments always give the same samples."""
        ...
