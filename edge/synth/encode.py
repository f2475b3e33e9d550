"""Encoding a whole render at once: the streaming encoders fed everything in one piece, so a
complete object and a streamed one come out of the same code (edge.synth.streaming)."""

from __future__ import annotations

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.streaming import OGG_SERIAL, stream_encoder, to_pcm16

__all__ = ["OGG_SERIAL", "encode", "to_pcm16"]


def encode(audio: Audio, sample_rate: int, fmt: AudioFormat) -> bytes:
    """A complete file of `fmt` holding `audio`."""
    encoder = stream_encoder(fmt, sample_rate)
    return encoder.feed(audio) + encoder.finish()
