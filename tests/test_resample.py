"""edge/synth/resample.py: the streaming resampler used to feed Opus at rates it accepts."""

from __future__ import annotations

import numpy as np
import pytest

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.encode import encode
from nearvoice.edge.synth.resample import Resampler
from nearvoice.edge.synth.streaming import stream_encoder

SOURCE, TARGET = 22050, 24000


def tone(seconds: float = 1.0, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(SOURCE * seconds)) / SOURCE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def run(resampler: Resampler, chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([resampler.process(c) for c in chunks] + [resampler.flush()])


def test_output_length_follows_the_rate_ratio() -> None:
    x = tone(2.0)
    y = run(Resampler(SOURCE, TARGET), [x])
    assert abs(len(y) - len(x) * TARGET / SOURCE) < 40


def test_a_tone_keeps_its_frequency_and_level() -> None:
    x = tone(1.0, 440.0)
    resampler = Resampler(SOURCE, TARGET)
    y = run(resampler, [x])
    delay = resampler._delay / SOURCE
    t = np.arange(len(y)) / TARGET
    expected = 0.5 * np.sin(2 * np.pi * 440.0 * (t - delay))
    middle = slice(500, len(y) - 500)
    assert np.abs(y[middle] - expected[middle]).max() < 1e-3


def test_chunking_does_not_change_the_samples() -> None:
    x = tone(1.5)
    whole = run(Resampler(SOURCE, TARGET), [x])
    pieces = run(Resampler(SOURCE, TARGET), [x[:1000], x[1000:1001], x[1001:20000], x[20000:]])
    np.testing.assert_array_equal(whole, pieces)


def test_resamplers_of_one_rate_pair_share_one_read_only_filter() -> None:
    first, second = Resampler(SOURCE, TARGET), Resampler(SOURCE, TARGET)
    assert first._phases is second._phases
    assert not first._phases.flags.writeable
    assert Resampler(48000, TARGET)._phases is not first._phases
    # Sharing the design changes no sample: two resamplers fed alike give the same output.
    x = tone(0.5)
    np.testing.assert_array_equal(run(first, [x]), run(second, [x[:777], x[777:]]))


def test_content_above_the_lower_nyquist_is_removed_when_downsampling() -> None:
    rate = 48000
    t = np.arange(rate) / rate
    x = (0.5 * np.sin(2 * np.pi * 15000 * t)).astype(np.float32)  # above 12 kHz
    y = run(Resampler(rate, 24000), [x])
    assert np.abs(y[200:-200]).max() < 0.01


@pytest.mark.parametrize("rate", [22050, 44100])
def test_opus_accepts_rates_its_codec_does_not(rate: int) -> None:
    t = np.arange(rate) / rate
    audio = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    first = encode(audio, rate, AudioFormat.OPUS)
    assert first.startswith(b"OggS")
    assert encode(audio, rate, AudioFormat.OPUS) == first


def test_opus_at_a_native_rate_is_not_resampled() -> None:
    assert type(stream_encoder(AudioFormat.OPUS, 24000)).__name__ == "OpusEncoder"
