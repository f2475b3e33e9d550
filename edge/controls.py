"""The expressive controls of a request (docs/contracts.md#spec-and-key), as the doors that
build specs take them: `nearvoice sign`'s flags, the minting API's and the OpenAI-compatible API's
JSON fields. Each door validates the same way, so a spec that no engine in the stack
honours is refused when it is made (`unsupported_control`), never accepted and failed at
an edge later; and a duration outside 0.5-2.0x of the voice's natural length is refused
wherever that length is known (`duration_out_of_range`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nearvoice.edge.spec import Emotion, Spec, SpecError
from nearvoice.edge.synth import fit
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.voices import Voice, refused_control

FIELDS = frozenset(("duration", "emotion", "ref", "lang"))


def from_json(body: Mapping[str, Any]) -> dict[str, Any]:
    """`Spec.create` arguments from JSON fields: `duration` (seconds), `emotion` (an object,
    or a label string), `lang`; `ref` is returned as `ref_id` for the caller to resolve
    (only an origin knows the clip's hash). Raises SpecError."""
    out: dict[str, Any] = {}
    duration = body.get("duration")
    if duration is not None:
        if not isinstance(duration, int | float) or isinstance(duration, bool):
            raise SpecError("bad_duration", "duration must be a number of seconds")
        out["duration"] = float(duration)
    emotion = body.get("emotion")
    if emotion is not None:
        out["emotion"] = (
            Emotion.create(label=emotion)
            if isinstance(emotion, str)
            else Emotion.from_json(emotion)
        )
    lang = body.get("lang")
    if lang is not None:
        if not isinstance(lang, str):
            raise SpecError("bad_lang", "lang must be a BCP 47 tag string")
        out["lang"] = lang
    ref = body.get("ref")
    if ref is not None:
        if not isinstance(ref, str):
            raise SpecError("bad_ref", "ref must be a reference voice id")
        out["ref_id"] = ref
    return out


def check_voice(voice: Voice, spec: Spec) -> None:
    """Raises SpecError `unsupported_control` when `voice`'s engine does not honour every
    control of `spec` (every node routes the voice to that engine, so none would)."""
    control = refused_control(voice, spec)
    if control is not None:
        raise SpecError(
            "unsupported_control",
            f"voice {voice.name!r} ({voice.engine}) does not honour the control {control!r}",
        )


def check_duration(spec: Spec, natural_samples: int | None, sample_rate: int) -> None:
    """Raises SpecError `duration_out_of_range` when the natural length is known and the
    spec's duration is not within 0.5-2.0x of it."""
    if spec.duration is None or natural_samples is None:
        return
    try:
        fit.check_range(spec.duration, natural_samples, sample_rate)
    except fit.DurationOutOfRange as exc:
        raise SpecError(exc.code, str(exc)) from exc


def natural_samples(engine: Engine, spec: Spec) -> int | None:
    """The voice's natural length for the spec's text (blocking: a duration pass)."""
    return engine.samples(spec.text, spec.voice, 1.0)
