"""The AAC streaming encoder: AAC-LC in ADTS frames (ISO/IEC 13818-7), through FFmpeg's
native `aac` encoder and `adts` muxer as PyAV ships them.

It keeps the streaming encoders' contract (edge.synth.streaming): every byte returned is
final, and the same audio gives the same bytes whatever pieces it is fed in.

* ADTS is a stream of self-delimiting frames, each with its own 7-byte header; the muxer
  never seeks back, so its output is written to an append-only sink and handed out as is.
  `flush_packets` makes it write each frame as soon as it is muxed, so a sentence's audio
  leaves with that sentence (less the encoder's look-ahead of one 1,024-sample frame).
* Reproducible bytes: `bitexact` keeps version strings and other build-dependent values
  out of the stream, FFmpeg's audio encoder runs on one thread, and the PyAV version (and
  so the FFmpeg it bundles) is pinned in pyproject.toml. PyAV re-frames whatever it is
  fed into the codec's 1,024-sample frames, so the chunking of the input does not matter.
* ADTS carries no encoder delay, so decoders play the encoder's priming (1,024 samples)
  as leading silence, and the last frame's padding as trailing silence.
"""

from __future__ import annotations

from typing import Self

import av
import numpy as np

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.engine import Audio

AAC_BITRATE = 64_000
"""Bits per second: transparent enough for mono speech at 22.05 or 24 kHz."""


class _Sink:
    """The muxer's output file: append-only, and it says so (seekable() is False)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        out = bytes(self._data)
        self._data.clear()
        return out


class AacEncoder:
    def __init__(self, sample_rate: int) -> None:
        self.content_type = AudioFormat.AAC.content_type(sample_rate)
        self._rate = sample_rate
        self._sink = _Sink()
        self._container: av.container.OutputContainer | None = av.open(
            self._sink,
            "w",
            format="adts",
            options={"flush_packets": "1", "fflags": "+bitexact"},
        )
        try:
            stream = self._container.add_stream(
                "aac", rate=sample_rate, options={"flags": "+bitexact"}
            )
            stream.codec_context.layout = "mono"
            stream.codec_context.bit_rate = AAC_BITRATE
            self._stream = stream
        except BaseException:
            self.close()
            raise

    def feed(self, audio: Audio) -> bytes:
        if self._container is None:
            raise RuntimeError("feed after finish or close")
        if len(audio):
            samples = np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = self._rate
            self._container.mux(self._stream.encode(frame))
        return self._sink.take()

    def finish(self) -> bytes:
        if self._container is None:
            raise RuntimeError("finish after finish or close")
        self._container.mux(self._stream.encode(None))
        self.close()
        return self._sink.take()

    def close(self) -> None:
        """Releases the muxer without finishing the object (idempotent)."""
        container, self._container = self._container, None
        if container is not None:
            container.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
