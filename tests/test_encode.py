"""edge/synth/encode.py and edge/synth/ogg.py: delivery encoders and Ogg serial pinning."""

from __future__ import annotations

import io
import os
import struct
import time

import numpy as np
import pytest
import soundfile

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.encode import OGG_SERIAL, encode, to_pcm16
from nearvoice.edge.synth.ogg import SerialPinner, ogg_crc, pin_serial
from nearvoice.edge.synth.streaming import stream_encoder
from tests.test_streaming import sndfile_decode

RATE = 24000
TONE_HZ = 440.0


def sine(seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (amplitude * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    return sndfile_decode(data)


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


# -- one code path ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_encode_is_one_feed_and_finish_of_the_stream_encoder(fmt: AudioFormat) -> None:
    audio = sine()
    encoder = stream_encoder(fmt, RATE)
    assert encode(audio, RATE, fmt) == encoder.feed(audio) + encoder.finish()


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


def bitwise_ogg_crc(data: bytes) -> int:
    """The Ogg CRC straight from its definition, one bit at a time."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 27, 255, 4096])
def test_ogg_crc_matches_its_bitwise_definition(size: int) -> None:
    data = os.urandom(size)
    assert ogg_crc(data) == bitwise_ogg_crc(data)


def test_ogg_crc_accepts_a_bytearray() -> None:
    data = os.urandom(100)
    assert ogg_crc(bytearray(data)) == ogg_crc(data)


def test_pinning_ten_seconds_of_opus_takes_under_ten_milliseconds() -> None:
    raw = libsndfile_opus(sine(10.0))
    started = time.perf_counter()
    pin_serial(raw, OGG_SERIAL)
    assert time.perf_counter() - started < 0.010


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


# -- incremental pinning -------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 7, 27, 1000])
def test_serial_pinner_gives_pin_serial_output_for_any_piece_size(piece: int) -> None:
    raw = libsndfile_opus(sine(0.5))
    pinner = SerialPinner(OGG_SERIAL)
    out = b"".join(pinner.push(raw[i : i + piece]) for i in range(0, len(raw), piece))
    assert out + pinner.finish() == pin_serial(raw, OGG_SERIAL)


def test_serial_pinner_returns_only_whole_pages() -> None:
    raw = libsndfile_opus(sine(0.5))
    first = ogg_pages(raw)[0]
    pinner = SerialPinner(OGG_SERIAL)
    assert pinner.push(raw[: len(first) - 1]) == b""
    assert len(pinner.push(raw[len(first) - 1 : len(first) + 1])) == len(first)


def test_serial_pinner_rejects_non_ogg_bytes_as_soon_as_it_sees_them() -> None:
    pinner = SerialPinner(OGG_SERIAL)
    with pytest.raises(ValueError, match="not an Ogg page at byte 0"):
        pinner.push(b"RIFF")


def test_serial_pinner_finish_rejects_a_partial_page() -> None:
    raw = libsndfile_opus(sine(0.1))
    pinner = SerialPinner(OGG_SERIAL)
    pinner.push(raw[:-5])
    with pytest.raises(ValueError, match="truncated Ogg page"):
        pinner.finish()
