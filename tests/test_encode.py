"""edge/synth/encode.py and edge/synth/ogg.py: delivery encoders and Ogg serial pinning."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile

from edge.formats import AudioFormat
from edge.synth.encode import OGG_SERIAL, encode, to_pcm16
from edge.synth.ogg import ogg_crc, pin_serial

RATE = 24000
TONE_HZ = 440.0


def sine(seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (amplitude * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def ogg_pages(data: bytes) -> list[bytes]:
    pages, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS"
        nsegs = data[pos + 26]
        end = pos + 27 + nsegs + sum(data[pos + 27 : pos + 27 + nsegs])
        pages.append(data[pos:end])
        pos = end
    return pages


def libsndfile_opus(audio: np.ndarray) -> bytes:
    """What libsndfile writes before any pinning (a random stream serial)."""
    out = io.BytesIO()
    soundfile.write(out, audio, RATE, format="OGG", subtype="OPUS")
    return out.getvalue()


# -- every format decodes ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [AudioFormat.WAV, AudioFormat.FLAC])
def test_lossless_formats_decode_to_the_same_samples(fmt: AudioFormat) -> None:
    audio = sine()
    samples, rate = decode(encode(audio, RATE, fmt))
    assert rate == RATE
    assert samples.shape == audio.shape
    assert np.max(np.abs(samples - audio)) < 2 / 32767


@pytest.mark.parametrize("fmt", [AudioFormat.MP3, AudioFormat.OPUS])
def test_lossy_formats_decode_to_the_same_tone(fmt: AudioFormat) -> None:
    audio = sine()
    samples, rate = decode(encode(audio, RATE, fmt))
    assert rate == RATE
    assert abs(len(samples) - len(audio)) < RATE // 10
    assert abs(dominant_hz(samples, rate) - TONE_HZ) < 5
    rms = float(np.sqrt(np.mean(samples**2)))
    assert 0.25 < rms < 0.45  # a 0.5-amplitude sine has RMS 0.354


def test_wav_container_is_16_bit_pcm() -> None:
    info = soundfile.info(io.BytesIO(encode(sine(), RATE, AudioFormat.WAV)))
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)


def test_flac_container_is_flac() -> None:
    assert encode(sine(), RATE, AudioFormat.FLAC)[:4] == b"fLaC"


def test_opus_container_is_ogg_opus() -> None:
    data = encode(sine(), RATE, AudioFormat.OPUS)
    first = ogg_pages(data)[0]
    assert first[28 : 28 + 8] == b"OpusHead"


def test_pcm_is_two_bytes_per_sample() -> None:
    audio = sine(0.37)
    assert len(encode(audio, RATE, AudioFormat.PCM)) == 2 * len(audio)


def test_pcm_is_little_endian_s16_of_the_samples() -> None:
    audio = sine()
    pcm = np.frombuffer(encode(audio, RATE, AudioFormat.PCM), dtype="<i2")
    assert np.max(np.abs(pcm / 32767.0 - audio)) < 1.5 / 32767


def test_pcm_clips_out_of_range_samples() -> None:
    audio = np.array([2.0, -2.0, 1.0, -1.0, 0.0], dtype=np.float32)
    assert np.frombuffer(to_pcm16(audio), dtype="<i2").tolist() == [
        32767,
        -32767,
        32767,
        -32767,
        0,
    ]


# -- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_encoding_is_byte_identical_across_two_encodes(fmt: AudioFormat) -> None:
    audio = sine()
    assert encode(audio, RATE, fmt) == encode(audio, RATE, fmt)


def test_libsndfile_alone_gives_a_random_serial() -> None:
    # Why pinning exists: without it two encodes of one spec differ.
    audio = sine(0.2)
    assert libsndfile_opus(audio) != libsndfile_opus(audio)


def test_every_opus_page_carries_the_pinned_serial() -> None:
    pages = ogg_pages(encode(sine(), RATE, AudioFormat.OPUS))
    assert len(pages) >= 3
    for page in pages:
        assert struct.unpack_from("<I", page, 14)[0] == OGG_SERIAL


# -- the Ogg CRC ---------------------------------------------------------------------------


def test_ogg_crc_matches_the_crc_libsndfile_wrote() -> None:
    pages = ogg_pages(libsndfile_opus(sine()))
    assert len(pages) >= 3
    for page in pages:
        stored = struct.unpack_from("<I", page, 22)[0]
        zeroed = bytearray(page)
        struct.pack_into("<I", zeroed, 22, 0)
        assert ogg_crc(zeroed) == stored


def test_ogg_crc_of_empty_input_is_zero() -> None:
    assert ogg_crc(b"") == 0


def test_pinned_pages_have_valid_crcs() -> None:
    for page in ogg_pages(encode(sine(), RATE, AudioFormat.OPUS)):
        stored = struct.unpack_from("<I", page, 22)[0]
        zeroed = bytearray(page)
        struct.pack_into("<I", zeroed, 22, 0)
        assert ogg_crc(zeroed) == stored


def test_pin_serial_changes_only_serial_and_crc_fields() -> None:
    raw = libsndfile_opus(sine(0.3))
    pinned = pin_serial(raw, 0x01020304)
    assert len(pinned) == len(raw)
    for before, after in zip(ogg_pages(raw), ogg_pages(pinned), strict=True):
        assert before[:14] == after[:14]
        assert after[14:18] == bytes([4, 3, 2, 1])
        assert before[26:] == after[26:]


def test_pin_serial_is_idempotent() -> None:
    raw = libsndfile_opus(sine(0.3))
    once = pin_serial(raw, OGG_SERIAL)
    assert pin_serial(once, OGG_SERIAL) == once


def test_pin_serial_rejects_non_ogg_data() -> None:
    with pytest.raises(ValueError, match="not an Ogg page"):
        pin_serial(encode(sine(0.1), RATE, AudioFormat.WAV), OGG_SERIAL)


def test_pin_serial_rejects_trailing_garbage() -> None:
    raw = libsndfile_opus(sine(0.1))
    with pytest.raises(ValueError, match="not an Ogg page"):
        pin_serial(raw + b"garbage!", OGG_SERIAL)


def test_pin_serial_rejects_a_truncated_page() -> None:
    raw = libsndfile_opus(sine(0.1))
    with pytest.raises(ValueError, match="truncated Ogg page"):
        pin_serial(raw[:-5], OGG_SERIAL)
