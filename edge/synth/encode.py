"""Encoding float32 mono audio into the delivery formats, through libsndfile."""

from __future__ import annotations

import io

import numpy as np
import soundfile

from edge.formats import AudioFormat
from edge.synth.engine import Audio
from edge.synth.ogg import pin_serial

OGG_SERIAL = 0x6E766F78  # b"nvox": fixed so renders are byte-identical (see edge.synth.ogg)

# (libsndfile container, subtype) for each format soundfile writes.
_SNDFILE: dict[AudioFormat, tuple[str, str]] = {
    AudioFormat.WAV: ("WAV", "PCM_16"),
    AudioFormat.FLAC: ("FLAC", "PCM_16"),
    AudioFormat.OPUS: ("OGG", "OPUS"),
    AudioFormat.MP3: ("MP3", "MPEG_LAYER_III"),
}


def to_pcm16(audio: Audio) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def encode(audio: Audio, sample_rate: int, fmt: AudioFormat) -> bytes:
    """A complete file of `fmt` holding `audio`."""
    if fmt is AudioFormat.PCM:
        return to_pcm16(audio)
    container, subtype = _SNDFILE[fmt]
    out = io.BytesIO()
    soundfile.write(out, audio, sample_rate, format=container, subtype=subtype)
    if fmt is AudioFormat.OPUS:
        return pin_serial(out.getvalue(), OGG_SERIAL)
    return out.getvalue()
