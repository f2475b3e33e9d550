"""Streaming rational resampling, for codecs that accept only some rates (Opus: 8, 12, 16,
24 and 48 kHz; piper voices are 22.05 kHz).

A polyphase windowed-sinc FIR: the input is conceptually upsampled by L, low-pass filtered
below the lower Nyquist frequency, and decimated by M, computing only the output samples
that survive decimation. The filter keeps its input history between calls, so a stream
resampled chunk by chunk has no seams, and the same chunks always give the same samples.
"""

from __future__ import annotations

import functools
from math import gcd

import numpy as np
import numpy.typing as npt

from nearvoice.edge.synth.engine import Audio

TAPS_PER_PHASE = 24  # filter taps per output sample when interpolating; more is sharper
KAISER_BETA = 8.0  # about 80 dB of stop-band attenuation


@functools.lru_cache(maxsize=16)
def design(up: int, down: int) -> npt.NDArray[np.float64]:
    """The filter for interpolating by `up` and decimating by `down`, as phases[p, k] =
    h[p + k * up] (the taps that meet input sample idx - k). Designed once per rate pair
    and shared, read-only, by every resampler of that pair: a render that resamples makes
    its resampler before its first byte, and the design (a windowed sinc of `up` x `k`
    taps, 3,840 for 22.05 to 24 kHz) need not be paid again there."""
    # Decimating by more than we interpolate needs a proportionally longer filter.
    k = TAPS_PER_PHASE * max(1, -(-down // up))
    taps = up * k
    cutoff = 0.5 / max(up, down)  # cycles per upsampled sample
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, KAISER_BETA) * up
    phases: npt.NDArray[np.float64] = h.reshape(k, up).T.copy()
    phases.flags.writeable = False
    return phases


class Resampler:
    def __init__(self, source_rate: int, target_rate: int) -> None:
        common = gcd(source_rate, target_rate)
        self.up = target_rate // common
        self.down = source_rate // common
        self._phases = design(self.up, self.down)
        self._k = self._phases.shape[1]
        self._history = np.zeros(self._k - 1)
        self._consumed = 0  # input samples seen
        self._produced = 0  # output samples emitted
        self._delay = (self.up * self._k - 1) / 2 / self.up  # group delay, in input samples

    def process(self, audio: Audio) -> Audio:
        before = self._consumed
        buffer = np.concatenate((self._history, audio.astype(np.float64)))
        self._consumed += len(audio)
        # Output n needs input floor(n * down / up); emit every n whose input exists.
        end = -(-self._consumed * self.up // self.down)
        outputs = np.arange(self._produced, end)
        self._produced = end
        self._history = buffer[len(buffer) - (self._k - 1) :]
        if not len(outputs):
            return np.zeros(0, np.float32)
        position = outputs * self.down
        index = position // self.up - before + (self._k - 1)
        gathered = buffer[index[:, None] - np.arange(self._k)[None, :]]
        result: Audio = np.einsum("nk,nk->n", self._phases[position % self.up], gathered).astype(
            np.float32
        )
        return result

    def output_count(self, samples: int) -> int:
        """How many samples a fresh resampler emits for `samples` in total, then `flush`."""
        return -(-(samples + self._flush_samples()) * self.up // self.down)

    def _flush_samples(self) -> int:
        return int(np.ceil(self._delay)) + 1

    def flush(self) -> Audio:
        """Pushes the filter's delay line through, so the last input samples come out."""
        return self.process(np.zeros(self._flush_samples(), np.float32))
