"""Audio formats a speech object can be delivered in, with their media types."""

from __future__ import annotations

from enum import StrEnum


class AudioFormat(StrEnum):
    WAV = "wav"
    MP3 = "mp3"
    OPUS = "opus"  # Ogg-encapsulated Opus (RFC 7845)
    FLAC = "flac"
    PCM = "pcm"  # raw signed 16-bit little-endian mono
    AAC = "aac"  # AAC-LC in ADTS frames (ISO/IEC 13818-7)

    @classmethod
    def parse(cls, value: str) -> AudioFormat | None:
        try:
            return cls(value)
        except ValueError:
            return None

    def content_type(self, sample_rate: int) -> str:
        if self is AudioFormat.PCM:
            # There is no registered type for little-endian PCM (audio/L16 is big-endian,
            # RFC 2586), so the parameters spell out what a player needs to decode it.
            return f"audio/pcm;rate={sample_rate};channels=1;encoding=s16le"
        return _CONTENT_TYPES[self]


_CONTENT_TYPES: dict[AudioFormat, str] = {
    AudioFormat.WAV: "audio/wav",
    AudioFormat.MP3: "audio/mpeg",
    AudioFormat.OPUS: "audio/ogg;codecs=opus",
    AudioFormat.FLAC: "audio/flac",
    AudioFormat.AAC: "audio/aac",
}
