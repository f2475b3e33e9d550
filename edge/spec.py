"""Speech object identity (docs/contracts.md#spec-and-key, a contract).

A speech object is defined by its canonical spec; its cache key is the SHA-256 of the
canonical JSON. The model identity is part of the spec, so a new model never serves stale
audio under an old key.

The expressive controls (`duration`, `emotion`, `ref`, `lang`) and `rate` are optional
fields, each in the canonical JSON only when set, so every key minted before a field
existed stays valid. Pronunciation hints stay inside the text (edge.synth.hints) and are
checked for form here; which engine honours which control is edge.synth.capability's.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth import hints

SPEC_VERSION = 1
MIN_SPEED = 0.5
MAX_SPEED = 2.0
MIN_RATE = 8000  # Hz: the lowest rate the codecs take (Opus, AAC)
MAX_RATE = 48000  # Hz: the highest
KEY_RE = re.compile(r"[0-9a-f]{64}")
MAX_DURATION = 600.0  # seconds: the longest object a `duration` may ask for
EMOTIONS = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm")
"""IndexTTS2's emotion vector order; its labels are these names (and `excited` ...)."""
EMOTION_LABEL_RE = re.compile(r"[a-z][a-z_-]{0,31}")
MAX_EMOTION_TEXT = 200  # characters of an emotion instruction
REF_ID_RE = re.compile(r"ref_[0-9a-f]{16,64}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
LANG_RE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")

DURATION = "duration"
EMOTION = "emotion"
REF = "ref"
LANG = "lang"
CONTROLS = frozenset((DURATION, EMOTION, REF, LANG, hints.IPA, hints.PINYIN))
"""Every optional control a spec may carry (docs/contracts.md#spec-and-key); engines declare the
ones they honour."""


class SpecError(ValueError):
    """A spec that cannot describe a speech object. `code` is the JSON error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Emotion:
    """One of a label, an 8-number vector (IndexTTS2's order, EMOTIONS) or an instruction
    text, with a strength `alpha` in 0..1. Numbers are rounded to 2 decimals."""

    label: str | None = None
    vector: tuple[float, ...] | None = None
    text: str | None = None
    alpha: float = 1.0

    @classmethod
    def create(
        cls,
        *,
        label: str | None = None,
        vector: list[float] | tuple[float, ...] | None = None,
        text: str | None = None,
        alpha: float | None = None,
    ) -> Emotion:
        given = [x for x in (label, vector, text) if x is not None]
        if len(given) != 1:
            raise SpecError("bad_emotion", "emotion takes exactly one of label, vector, text")
        if alpha is None:
            alpha = 1.0
        if not _number(alpha) or not 0.0 <= alpha <= 1.0:
            raise SpecError("bad_emotion", "emotion alpha must be a number within 0..1")
        if label is not None and not (isinstance(label, str) and EMOTION_LABEL_RE.fullmatch(label)):
            raise SpecError("bad_emotion", "emotion label must be a lowercase word")
        if vector is not None:
            if (
                not isinstance(vector, list | tuple)
                or len(vector) != len(EMOTIONS)
                or not all(_number(x) and 0.0 <= x <= 1.0 for x in vector)
            ):
                raise SpecError(
                    "bad_emotion", f"emotion vector must be {len(EMOTIONS)} numbers within 0..1"
                )
            vector = tuple(round(float(x), 2) for x in vector)
        if text is not None:
            text = normalize_text(text) if isinstance(text, str) else ""
            if not text or len(text) > MAX_EMOTION_TEXT:
                raise SpecError(
                    "bad_emotion", f"emotion text must be 1..{MAX_EMOTION_TEXT} characters"
                )
        return cls(label=label, vector=vector, text=text, alpha=round(float(alpha), 2))

    def canonical(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.label is not None:
            fields["label"] = self.label
        if self.vector is not None:
            fields["vector"] = list(self.vector)
        if self.text is not None:
            fields["text"] = self.text
        if self.alpha != 1.0:  # the default is left out: one object, one key
            fields["alpha"] = self.alpha
        return fields

    @classmethod
    def from_json(cls, data: object) -> Emotion:
        if not isinstance(data, dict) or not set(data) <= {"label", "vector", "text", "alpha"}:
            raise SpecError("bad_emotion", "emotion must be an object: label, vector or text")
        return cls.create(
            label=data.get("label"),
            vector=data.get("vector"),
            text=data.get("text"),
            alpha=data.get("alpha"),
        )


@dataclass(frozen=True, slots=True)
class Ref:
    """A registered reference voice (docs/contracts.md#reference-voices) and the SHA-256 of its
    canonical clip, bound into the spec so a replaced clip never serves old audio."""

    id: str
    sha256: str

    @classmethod
    def create(cls, id: object, sha256: object) -> Ref:
        if not isinstance(id, str) or not REF_ID_RE.fullmatch(id):
            raise SpecError("bad_ref", "ref must be a reference voice id, ref_<hex>")
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256.lower()):
            raise SpecError("bad_ref", "ref needs the clip's sha256 (64 hex digits)")
        return cls(id, sha256.lower())

    def canonical(self) -> dict[str, str]:
        return {"id": self.id, "sha256": self.sha256}


def normalize_lang(tag: str) -> str:
    """A BCP 47 tag in its conventional case: `en-US`, `zh-Hans-CN`."""
    if not isinstance(tag, str) or not LANG_RE.fullmatch(tag):
        raise SpecError("bad_lang", "lang must be a BCP 47 tag such as en-US")
    first, *rest = tag.split("-")
    parts = [first.lower()]
    for sub in rest:
        if len(sub) == 2 and sub.isalpha():
            parts.append(sub.upper())
        elif len(sub) == 4 and sub.isalpha():
            parts.append(sub.title())
        else:
            parts.append(sub.lower())
    return "-".join(parts)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
    duration: float | None = None
    """Target length in seconds (2 decimals); replaces `speed`. Optional, as `rate`."""
    emotion: Emotion | None = None
    ref: Ref | None = None
    lang: str | None = None
    """A BCP 47 tag, when the text alone does not say the language."""
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
        duration: float | None = None,
        emotion: Emotion | None = None,
        ref: Ref | None = None,
        lang: str | None = None,
    ) -> Spec:
        text = normalize_text(text)
        if not text:
            raise SpecError("empty_text", "text is empty after normalization")
        try:
            hints.kinds(text)
        except hints.HintError as exc:
            raise SpecError(exc.code, str(exc)) from exc
        speed = round(float(speed), 2)
        if duration is not None:
            if not _number(duration) or not 0 < round(float(duration), 2) <= MAX_DURATION:
                raise SpecError("bad_duration", f"duration must be within 0..{MAX_DURATION} s")
            if speed != 1.0:
                raise SpecError(
                    "conflicting_controls", "a spec has a duration or a speed, not both"
                )
            duration = round(float(duration), 2)
        if lang is not None:
            lang = normalize_lang(lang)
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
            duration=duration,
            emotion=emotion,
            ref=ref,
            lang=lang,
        )

    def controls(self) -> frozenset[str]:
        """The optional controls this spec uses: what an engine must honour to render it."""
        used = {
            name
            for name, value in (
                (DURATION, self.duration),
                (EMOTION, self.emotion),
                (REF, self.ref),
                (LANG, self.lang),
            )
            if value is not None
        }
        return frozenset(used) | hints.kinds(self.text)

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
        # Each expressive control only when set, so every key minted before it stays valid.
        if self.duration is not None:
            fields[DURATION] = self.duration
        if self.emotion is not None:
            fields[EMOTION] = self.emotion.canonical()
        if self.ref is not None:
            fields[REF] = self.ref.canonical()
        if self.lang is not None:
            fields[LANG] = self.lang
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
        duration, emotion, ref, lang = (data.get(n) for n in (DURATION, EMOTION, REF, LANG))
        if duration is not None and not _number(duration):
            raise SpecError("bad_spec", "duration must be a number")
        if lang is not None and not isinstance(lang, str):
            raise SpecError("bad_spec", "lang must be a string")
        if ref is not None and not isinstance(ref, dict):
            raise SpecError("bad_spec", "ref must be an object")
        return cls.create(
            text=text,
            voice=voice,
            format=fmt,
            model=model,
            speed=speed,
            seed=seed,
            rate=rate,
            duration=duration,
            emotion=None if emotion is None else Emotion.from_json(emotion),
            ref=None if ref is None else Ref.create(ref.get("id"), ref.get("sha256")),
            lang=lang,
        )
