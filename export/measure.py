"""Measuring a variant: render the fixed sentences, compare with the source, time it.

Parity is judged on what a listener hears, after the family's back end: a log-mel spectral
distance (dB) and a waveform SNR against the source model's audio for the same inputs.
Speed is seconds of audio per second of rendering on one CPU thread (intra- and inter-op
threads 1, sequential execution), the minimum over repeats for each chunk, because a
shared machine only ever makes a run slower.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.providers import NAMES
from nearvoice.edge.synth.providers import session as engine_session
from nearvoice.export.frontends import Feeds, Frontend

N_FFT = 1024  # samples per STFT frame
HOP = 256  # samples between frames
N_MELS = 80
DYNAMIC_RANGE_DB = 80.0  # quieter than the reference's peak by more than this counts as silence


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A variant passes parity when every sentence has the source's length and is
    within both bounds."""

    max_mel_db: float = 3.0
    """Largest log-mel distance allowed on any sentence (dB, RMS over mel bands, mean over
    frames): below ~1 dB is inaudible, 3 dB is a just-noticeable timbre change."""
    min_snr_db: float = 10.0
    """Smallest waveform SNR allowed on any sentence (dB); misaligned durations pull it
    down even when the spectrum matches, which the length check also reports."""


@dataclass(frozen=True, slots=True)
class Parity:
    mel_db_mean: float
    mel_db_max: float
    snr_db_mean: float
    snr_db_min: float
    length_mismatches: int
    """Sentences whose length in samples differs from the source's."""
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class Speed:
    provider: str
    threads: int
    audio_s: float
    wall_s: float

    @property
    def x_realtime(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "threads": self.threads,
            "audio_s": round(self.audio_s, 3),
            "wall_s": round(self.wall_s, 4),
            "x_realtime": round(self.x_realtime, 2),
        }


def session(model: Path, provider: str = "cpu", threads: int = 1, options: Any = None) -> Any:
    """A session as the engines build one, on one provider only. onnxruntime falls back
    to the CPU when a provider cannot start, which would make a GPU row a CPU timing:
    that is an error here."""
    loaded = engine_session(model, threads, [(NAMES[provider], options or {})])
    running = loaded.get_providers()
    if not running or running[0] != NAMES[provider]:
        raise RuntimeError(f"{provider} did not start; onnxruntime runs {running}")
    return loaded


def render(
    sess: Any, frontend: Frontend, encoded: Sequence[Sequence[Feeds]], repeats: int = 1
) -> tuple[list[Audio], float, bool]:
    """Each sentence's audio, the rendering seconds (per chunk, the best of `repeats`) and
    whether every repeat gave bit-identical audio."""
    audios: list[Audio] = []
    wall = 0.0
    deterministic = True
    for feeds in encoded:
        parts: list[Audio] = []
        for index, feed in enumerate(feeds):
            best = float("inf")
            first: Audio | None = None
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                audio = frontend.decode(sess.run(None, feed), index)
                best = min(best, time.perf_counter() - start)
                if first is None:
                    first = audio
                elif not np.array_equal(first, audio):
                    deterministic = False
            assert first is not None
            parts.append(first)
            wall += best
        audios.append(np.concatenate(parts) if parts else np.zeros(0, np.float32))
    return audios, wall, deterministic


def _mel_filterbank(sample_rate: int) -> npt.NDArray[np.float64]:
    """HTK mel triangles over the STFT bins, [N_MELS, N_FFT // 2 + 1]."""

    def to_mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    edges = to_hz(np.linspace(0.0, to_mel(np.array(sample_rate / 2.0)), N_MELS + 2))
    bins = np.linspace(0.0, sample_rate / 2.0, N_FFT // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - bins) / np.maximum(upper - centre, 1e-9)
    bank: npt.NDArray[np.float64] = np.maximum(0.0, np.minimum(rising, falling))
    return bank


def log_mel(audio: npt.NDArray[np.floating[Any]], sample_rate: int) -> npt.NDArray[np.float64]:
    """Log-mel power spectrogram in dB, [frames, N_MELS]."""
    x = np.asarray(audio, dtype=np.float64)
    if len(x) < N_FFT:
        x = np.pad(x, (0, N_FFT - len(x)))
    frames = 1 + (len(x) - N_FFT) // HOP
    index = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    spectrum = np.abs(np.fft.rfft(x[index] * np.hanning(N_FFT), axis=1)) ** 2
    mel = spectrum @ _mel_filterbank(sample_rate).T
    db: npt.NDArray[np.float64] = 10.0 * np.log10(np.maximum(mel, 1e-10))
    return db


def _padded(ref: Audio, test: Audio) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Both as float64 over the longer length, the shorter padded with silence: audio a
    variant drops, or adds, counts as error rather than going unseen."""
    n = max(len(ref), len(test))
    a = np.zeros(n, dtype=np.float64)
    b = np.zeros(n, dtype=np.float64)
    a[: len(ref)] = ref
    b[: len(test)] = test
    return a, b


def mel_distance(ref: Audio, test: Audio, sample_rate: int) -> float:
    """RMS over mel bands of the dB difference, averaged over frames, over the longer of
    the two. Both are floored DYNAMIC_RANGE_DB below the reference's peak so that noise in
    silence, which nobody hears, does not dominate. Non-finite audio is infinitely far."""
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(test))):
        return float("inf")
    a_wave, b_wave = _padded(ref, test)
    if len(a_wave) == 0:
        return 0.0
    a, b = log_mel(a_wave, sample_rate), log_mel(b_wave, sample_rate)
    floor = a.max() - DYNAMIC_RANGE_DB
    a, b = np.maximum(a, floor), np.maximum(b, floor)
    return float(np.mean(np.sqrt(np.mean((a - b) ** 2, axis=1))))


def snr(ref: Audio, test: Audio) -> float:
    """10 log10(signal energy / error energy) over the longer of the two; 99 dB for
    identical audio, minus infinity for non-finite audio."""
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(test))):
        return float("-inf")
    r, t = _padded(ref, test)
    error = float(np.sum((r - t) ** 2))
    signal = float(np.sum(r * r))
    if error == 0.0:
        return 99.0
    return float(min(99.0, 10.0 * np.log10(max(signal, 1e-20) / error)))


def parity(
    refs: Sequence[Audio], tests: Sequence[Audio], sample_rate: int, thresholds: Thresholds
) -> Parity:
    """Passes when every sentence keeps its length (a duration that changed shifts all
    that follows) and is within both bounds."""
    pairs = list(zip(refs, tests, strict=True))
    mels = [mel_distance(r, t, sample_rate) for r, t in pairs]
    snrs = [snr(r, t) for r, t in pairs]
    mismatches = sum(len(r) != len(t) for r, t in pairs)
    passed = (
        mismatches == 0
        and max(mels) <= thresholds.max_mel_db
        and min(snrs) >= thresholds.min_snr_db
    )
    return Parity(
        mel_db_mean=float(np.mean(mels)),
        mel_db_max=float(max(mels)),
        snr_db_mean=float(np.mean(snrs)),
        snr_db_min=float(min(snrs)),
        length_mismatches=mismatches,
        passed=passed,
    )
