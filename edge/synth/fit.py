"""Fitting an utterance to a target length (the spec's `duration`, docs/contracts.md#spec-and-key).

The duration pass (edge.synth.durations) says exactly how many samples a render will
have at a given speed, without rendering. So fitting never stretches a waveform: it
chooses the speed (the model's length scale) from the pass's count at speed 1, runs the
pass again at that speed, and, when the frames' rounding left the count off by more than
the tolerance, corrects the speed by the ratio and runs it once more. The count at the
chosen speed is the render's exact length, announced before its first byte as for any
other object.

Everything here is arithmetic on the integer counts the pass returns, so every node
chooses the same speed for the same spec and renders byte-identical objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from nearvoice.edge.synth.engine import Engine

MIN_RATIO = 0.5
MAX_RATIO = 2.0
"""A target may be 0.5-2.0x the voice's natural length: the engines' speed range."""
TOLERANCE = 0.02
"""The fit's allowed error, as a fraction of the target (or one frame, if larger)."""
MAX_PASSES = 12
"""Duration passes a fit may run at most (most fits take 2-3: the natural length, the
first guess, one correction)."""
MAX_SPEED_FACTOR = 4.0
"""Bounds of the length scale a fit tries (1/4..4): far past any target in range."""


class DurationOutOfRange(ValueError):
    code = "duration_out_of_range"


class CannotFit(ValueError):
    """The engine has no working duration pass for this voice, or no speed it can render
    at lands within the tolerance (the render fails rather than miss the length)."""


@dataclass(frozen=True, slots=True)
class Fit:
    speed: float
    """The speed the render runs at."""
    samples: int
    """Exactly what the render at `speed` yields."""
    passes: int
    """Duration passes run, the natural length's included."""


def target_samples(duration: float, sample_rate: int) -> int:
    return round(duration * sample_rate)


def check_range(duration: float, natural_samples: int, sample_rate: int) -> None:
    """Raises DurationOutOfRange unless the target is 0.5-2.0x the natural length."""
    natural = natural_samples / sample_rate
    if natural <= 0 or not MIN_RATIO <= duration / natural <= MAX_RATIO:
        raise DurationOutOfRange(
            f"duration {duration:.2f} s is outside {MIN_RATIO}-{MAX_RATIO}x of this "
            f"voice's natural {natural:.2f} s for this text "
            f"({natural * MIN_RATIO:.2f}-{natural * MAX_RATIO:.2f} s)"
        )


def tolerance(target: int, frame: int) -> int:
    """Samples the fitted length may differ from `target`: 2 % or one frame."""
    return max(int(target * TOLERANCE), frame)


def fit(engine: Engine, text: str, voice: str, duration: float) -> Fit:
    """The speed at which `engine` renders `text` in `duration` seconds, within the
    tolerance. Raises DurationOutOfRange or CannotFit. Runs in an inference thread."""
    natural = engine.samples(text, voice, 1.0)
    if natural is None:
        raise CannotFit(f"{engine.name} has no duration pass for voice {voice!r}")
    check_range(duration, natural, engine.sample_rate)
    target = target_samples(duration, engine.sample_rate)
    allowed = tolerance(target, frame_samples(engine))
    # The length is close to linear in the length scale (1 / speed): proportional for the
    # durations, offset by what does not scale (a minimum frame per token), with the odd
    # jump where the model adds or drops a pause. The first guess assumes proportion;
    # then each pass interpolates between the nearest counts below and above the target
    # (a bracket), bisecting when interpolation would creep, so a jump cannot stall it.
    scale, count, passes = 1.0, natural, 1
    below: tuple[float, int] | None = None
    above: tuple[float, int] | None = None
    best = (abs(count - target), scale, count)
    while abs(count - target) > allowed and passes < MAX_PASSES:
        if count < target:
            below = (scale, count) if below is None or scale > below[0] else below
        else:
            above = (scale, count) if above is None or scale < above[0] else above
        if below is not None and above is not None:
            (low, low_count), (high, high_count) = below, above
            guess = low + (target - low_count) * (high - low) / max(high_count - low_count, 1)
            margin = (high - low) / 8
            if not low + margin <= guess <= high - margin:
                guess = (low + high) / 2
        else:
            guess = scale * target / count
        guess = min(max(guess, 1 / MAX_SPEED_FACTOR), MAX_SPEED_FACTOR)
        counted = engine.samples(text, voice, 1 / guess)
        passes += 1
        if counted is None:
            raise CannotFit(f"{engine.name}'s duration pass stopped answering")
        scale, count = guess, counted
        best = min(best, (abs(count - target), scale, count))
    error, scale, count = best
    if error > allowed:  # a model whose lengths jump past the target: never a wrong length
        raise CannotFit(
            f"{engine.name} cannot say this text in {duration:.2f} s within "
            f"{allowed} samples (closest: {count / engine.sample_rate:.3f} s)"
        )
    return Fit(1 / scale, count, passes)


def frame_samples(engine: Engine) -> int:
    """Samples per duration frame of `engine` (1 when it does not say)."""
    return int(getattr(engine, "frame_samples", 1))
