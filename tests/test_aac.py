"""The AAC streaming encoder (edge.synth.aac): ADTS frames, bytes independent of how the
audio is cut into feeds, every byte final, and a pinned PyAV."""

from __future__ import annotations

import itertools
from importlib.metadata import version

import numpy as np

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.streaming import stream_encoder

RATE = 24000


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


def encode(pieces: list[np.ndarray]) -> tuple[bytes, list[bytes]]:
    encoder = stream_encoder(AudioFormat.AAC, RATE)
    outputs = [encoder.feed(piece) for piece in pieces]
    outputs.append(encoder.finish())
    return b"".join(outputs), outputs


def adts_frames(data: bytes) -> list[int]:
    """The length of each ADTS frame, walking the headers (ISO/IEC 13818-7, 6.2)."""
    lengths, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0xFF and data[pos + 1] & 0xF6 == 0xF0, pos  # sync, layer 0
        length = ((data[pos + 3] & 0x03) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
        lengths.append(length)
        pos += length
    assert pos == len(data)
    return lengths


def test_the_same_audio_gives_the_same_bytes_however_it_is_fed() -> None:
    audio = tone(2.0)
    whole, _ = encode([audio])
    cuts = [0, 1, 999, 1024, 7000, 30000, len(audio)]
    pieces = [audio[a:b] for a, b in itertools.pairwise(cuts)]
    assert encode(pieces)[0] == whole
    assert encode([audio])[0] == whole  # and on every run


def test_bytes_leave_with_the_audio_as_whole_adts_frames() -> None:
    audio = tone(2.0)
    _, outputs = encode([audio[:24000], audio[24000:]])
    assert outputs[0], "the first second of audio must produce frames at once"
    for out in outputs:
        if out:
            adts_frames(out)  # each output is whole frames
    frames = adts_frames(b"".join(outputs))
    assert len(frames) >= len(audio) // 1024


def test_pyav_is_the_pinned_version() -> None:
    assert version("av") == "18.1.0"  # another FFmpeg may write other bytes
