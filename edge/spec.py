"""Speech object identity (DESIGN.md section 2, a contract).

A speech object is defined by its canonical spec; its cache key is the SHA-256 of the
canonical JSON. The model identity is part of the spec, so a new model never serves stale
audio under an old key.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from edge.formats import AudioFormat

SPEC_VERSION = 1
MIN_SPEED = 0.5
MAX_SPEED = 2.0
MIN_RATE = 8000  # Hz: the lowest rate the codecs take (Opus, AAC)
MAX_RATE = 48000  # Hz: the highest
KEY_RE = re.compile(r"[0-9a-f]{64}")


class SpecError(ValueError):
    """A spec that cannot describe a speech object. `code` is the JSON error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def normalize_text(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, ends trimmed, case kept."""
    return " ".join(unicodedata.normalize("NFC", text).split())


@dataclass(frozen=True, slots=True)
class Spec:
    """A canonical speech spec. Build it with `Spec.create`, which normalizes every field."""

    text: str
    voice: str
    format: AudioFormat
    speed: float
    seed: int
    model: str
    """The engine's model identity, `name@sha256`, resolved from the voice."""
    rate: int | None = None
    """Output sample rate in Hz, only when it differs from the voice's own (the OpenAI
    API's 24 kHz `pcm`): a resampled object is a different object. In the canonical JSON
    only when set, so every key minted before the field existed stays valid."""
    key: str = field(init=False, repr=False, compare=False)
    """Lowercase hex SHA-256 of `to_json()`: the object's cache key."""

    def __post_init__(self) -> None:
        # Computed once: the key is read on every request.
        object.__setattr__(self, "key", hashlib.sha256(self.to_json()).hexdigest())

    @classmethod
    def create(
        cls,
        *,
        text: str,
        voice: str,
        format: AudioFormat,
        model: str,
        speed: float = 1.0,
        seed: int = 0,
        rate: int | None = None,
    ) -> Spec:
        text = normalize_text(text)
        if not text:
            raise SpecError("empty_text", "text is empty after normalization")
        speed = round(float(speed), 2)
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise SpecError("bad_speed", f"speed must be within {MIN_SPEED}..{MAX_SPEED}")
        if rate is not None and not MIN_RATE <= rate <= MAX_RATE:
            raise SpecError("bad_rate", f"rate must be within {MIN_RATE}..{MAX_RATE} Hz")
        return cls(
            text=text,
            voice=voice,
            format=format,
            speed=speed,
            seed=int(seed),
            model=model,
            rate=rate,
        )

    def canonical(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "v": SPEC_VERSION,
            "text": self.text,
            "voice": self.voice,
            "format": self.format.value,
            "speed": self.speed,
            "seed": self.seed,
            "model": self.model,
        }
        if self.rate is not None:
            fields["rate"] = self.rate
        return fields

    def to_json(self) -> bytes:
        """Canonical JSON: sorted keys, compact separators, UTF-8."""
        return json.dumps(
            self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Spec:
        """Parses a spec as sealed in a URL. Normalization is re-applied so a spec
        that was not canonical when sealed gets a key that will not match its URL."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError("bad_spec", "sealed spec is not JSON") from exc
        if not isinstance(data, dict) or data.get("v") != SPEC_VERSION:
            raise SpecError("bad_spec", "unsupported spec version")
        fmt = AudioFormat.parse(str(data.get("format")))
        if fmt is None:
            raise SpecError("unsupported_format", f"unknown format {data.get('format')!r}")
        text, voice, model = data.get("text"), data.get("voice"), data.get("model")
        speed, seed = data.get("speed"), data.get("seed")
        if not (isinstance(text, str) and isinstance(voice, str) and isinstance(model, str)):
            raise SpecError("bad_spec", "text, voice and model must be strings")
        if not isinstance(speed, int | float) or isinstance(speed, bool):
            raise SpecError("bad_spec", "speed must be a number")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise SpecError("bad_spec", "seed must be an integer")
        rate = data.get("rate")
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool)):
            raise SpecError("bad_spec", "rate must be an integer")
        return cls.create(
            text=text, voice=voice, format=fmt, model=model, speed=speed, seed=seed, rate=rate
        )
