"""export/measure.py: the parity metrics (log-mel distance, SNR) and the render loop."""

from __future__ import annotations

import numpy as np
import pytest

from nearvoice.export.measure import Thresholds, mel_distance, parity, snr

RATE = 16000


def tone(seconds: float = 1.0, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_snr_of_identical_audio_is_the_ceiling() -> None:
    assert snr(tone(), tone()) == 99.0


def test_snr_measures_added_noise() -> None:
    signal = tone()
    noise = np.random.default_rng(0).normal(0, 1, len(signal)).astype(np.float32)
    noise *= np.sqrt(np.mean(signal**2) / np.mean(noise**2)) / 10  # 20 dB below
    assert snr(signal, signal + noise) == pytest.approx(20.0, abs=0.2)


def test_mel_distance_of_identical_audio_is_zero() -> None:
    assert mel_distance(tone(), tone(), RATE) == 0.0


def test_mel_distance_of_a_6_db_gain_is_6_db() -> None:
    # broadband, so that every mel band is above the floor
    noise = np.random.default_rng(2).normal(0, 0.1, RATE).astype(np.float32)
    assert mel_distance(noise, 2 * noise, RATE) == pytest.approx(6.02, abs=0.05)


def test_mel_distance_ignores_differences_below_the_dynamic_range() -> None:
    quiet = np.random.default_rng(1).normal(0, 1e-6, RATE).astype(np.float32)
    assert mel_distance(tone(), tone() + quiet, RATE) < 0.01


def test_parity_passes_within_both_bounds() -> None:
    result = parity([tone()], [tone() * 1.01], RATE, Thresholds())
    assert result.passed
    assert result.length_mismatches == 0


def test_parity_fails_on_the_worst_sentence() -> None:
    refs = [tone(), tone(freq=330.0)]
    tests = [tone(), tone(freq=331.0)]  # the second drifts out of phase
    result = parity(refs, tests, RATE, Thresholds())
    assert not result.passed
    assert result.snr_db_min < Thresholds().min_snr_db
    assert result.snr_db_mean > result.snr_db_min


def test_parity_counts_length_mismatches() -> None:
    result = parity([tone(1.0)], [tone(1.1)], RATE, Thresholds())
    assert result.length_mismatches == 1


def test_parity_fails_when_a_sentence_changes_length() -> None:
    result = parity([tone(1.0)], [tone(1.1)], RATE, Thresholds(max_mel_db=99, min_snr_db=-99))
    assert not result.passed


def test_audio_cut_short_counts_as_error() -> None:
    assert snr(tone(1.0), tone(1.0)[:1600]) < 1.0
    assert mel_distance(tone(1.0), tone(1.0)[:1600], RATE) > 10.0


def test_missing_audio_fails_parity() -> None:
    empty = np.zeros(0, np.float32)
    assert not parity([tone(), tone()], [tone(), empty], RATE, Thresholds()).passed


def test_non_finite_audio_fails_parity() -> None:
    broken = tone().copy()
    broken[100] = np.nan
    result = parity([tone(), tone()], [tone(), broken], RATE, Thresholds())
    assert not result.passed
    assert result.snr_db_min == float("-inf")
