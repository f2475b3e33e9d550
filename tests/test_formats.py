"""edge/formats.py: delivery formats and their media types."""

from __future__ import annotations

import pytest

from nearvoice.edge.formats import AudioFormat


@pytest.mark.parametrize("value", ["wav", "mp3", "opus", "flac", "pcm"])
def test_parse_accepts_each_extension(value: str) -> None:
    fmt = AudioFormat.parse(value)
    assert fmt is not None
    assert fmt.value == value


@pytest.mark.parametrize("value", ["ogg", "WAV", "", "wav ", "m4a"])
def test_parse_rejects_unknown_extensions(value: str) -> None:
    assert AudioFormat.parse(value) is None


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (AudioFormat.WAV, "audio/wav"),
        (AudioFormat.MP3, "audio/mpeg"),
        (AudioFormat.OPUS, "audio/ogg;codecs=opus"),
        (AudioFormat.FLAC, "audio/flac"),
    ],
)
def test_content_type_of_container_formats(fmt: AudioFormat, expected: str) -> None:
    assert fmt.content_type(24000) == expected


def test_content_type_of_container_formats_ignores_the_rate() -> None:
    assert AudioFormat.WAV.content_type(22050) == AudioFormat.WAV.content_type(24000)


def test_pcm_content_type_spells_out_rate_channels_and_encoding() -> None:
    assert AudioFormat.PCM.content_type(24000) == "audio/pcm;rate=24000;channels=1;encoding=s16le"


def test_pcm_content_type_follows_the_rate() -> None:
    assert "rate=22050" in AudioFormat.PCM.content_type(22050)
