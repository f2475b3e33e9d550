"""Streaming encoders: float32 mono audio in, sentence by sentence; delivery-format bytes out.

Every byte an encoder returns is final. The concatenation of everything `feed` and
`finish` return is the object, so a client that streams an object while it is rendered
receives a prefix of the final bytes (docs/contracts.md#spec-and-key), and a complete render is just
`feed(all) + finish()` through this same code (edge.synth.encode).

A header that records the length is written once, before any audio, so it can only hold
the length when the engine's duration pass (`Engine.samples`) told it in advance: an
encoder made with `total_samples` writes exact sizes, one made without writes the
formats' "unknown length" values. `encoded_length` gives the byte length that follows
from a sample count, where one does (WAV, PCM, MP3, Opus), so a node can announce an object's
exact size before its first byte (docs/contracts.md#exact-length-from-the-first-byte). The
renderer checks that the encoder wrote exactly that many bytes, and aborts the object if not.

WAV   written here, not by libsndfile: a 44-byte RIFF/WAVE header for PCM s16le mono,
      then the samples. With a known count the RIFF and data chunk sizes are exact;
      without, they are 0xFFFFFFFF, the conventional "unknown, streaming" value, which
      libsndfile (python-soundfile) and ffmpeg read to the end of the file and ffprobe
      measures from the file size (tests/test_streaming.py checks each). A size of 0,
      the other streaming convention, would not do: libsndfile reads zero frames.
PCM   raw s16le; no header at all.
FLAC  libsndfile/libFLAC. On close libFLAC seeks back to patch STREAMINFO (minimum and
      maximum frame size, total samples, MD5); those writes land on bytes already handed
      out and are dropped, leaving the values libFLAC wrote first: 0, which the FLAC
      format defines as "unknown". With a known count, `_FlacTotalSamples` writes the
      total sample count into STREAMINFO before the header is handed out, so
      python-soundfile, ffprobe and seeking decoders know the duration (without it,
      soundfile's `read` fails: libsndfile reports SF_COUNT_MAX frames). The byte length
      of FLAC is still unknown until the end: frames compress by content.
MP3   libsndfile/LAME, constant bitrate. LAME reserves the first frame for a Xing/LAME
      "Info" tag (frame count, seek table, gapless delay/padding) and fills it in on
      close; that rewrite would land on bytes already handed out, so the reserved frame
      (all zeros after its header) is cut from the stream instead: an Info frame that
      says nothing is of no use to a decoder, and left in it would play as a frame of
      silence. Without the tag, decoders also output LAME's encoder delay (1,105
      samples) and the last frame's padding, and estimate the duration from the file
      size and the first frame's bitrate. That is why the bitrate is constant rather
      than libsndfile's default VBR: with VBR the estimate is wrong, and libsndfile
      (mpg123) even stops reading at it, a quarter of the way in. At 22.05 and 24 kHz a
      48 kbps frame is too small for the tag, so LAME reserves none and nothing is cut.
      Constant bitrate also makes the byte length a function of the sample count
      (`mp3_length`).
OPUS  Ogg Opus through PyAV (FFmpeg's libopus wrapper) in constant-size packets, paged
      by our own muxer a fixed number of packets at a time: edge.synth.opus. Its byte
      length follows from the sample count (`opus_length`). Opus codes 8, 12, 16, 24 and
      48 kHz only; other rates are resampled to the next one up (edge.synth.resample).
AAC   ADTS through PyAV (FFmpeg's aac encoder and adts muxer): edge.synth.aac.

libsndfile (FLAC, MP3) writes into `_Sink`, an append-only file it believes it can seek
in: bytes not yet handed out may still be patched, writes entirely inside what was handed
out are dropped, and anything else (a write straddling the mark, a read of handed-out bytes) is
an error the encoder raises.

Encoders are not thread-safe; each is used by one thread at a time. `finish` closes the
libsndfile handle; `close` (or `with`) releases an encoder abandoned before `finish`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol, Self

import numpy as np
import soundfile

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.ogg import OGG_SERIAL as OGG_SERIAL
from nearvoice.edge.synth.resample import Resampler

MP3_KBPS_LSF = 48  # MPEG-2/2.5 (sample rates below 32 kHz)
MP3_KBPS_MPEG1 = 64  # MPEG-1 (32 kHz and up)

_UNKNOWN_SIZE = 0xFFFFFFFF


class StreamEncoder(Protocol):
    content_type: str

    def feed(self, audio: Audio) -> bytes:
        """Encodes float32 mono samples in [-1, 1]; returns the bytes this completes,
        which are final (possibly none)."""
        ...

    def finish(self) -> bytes:
        """Flushes and returns the rest of the object. Call once, after the last feed."""
        ...


def stream_encoder(
    fmt: AudioFormat, sample_rate: int, total_samples: int | None = None
) -> StreamEncoder:
    """A fresh encoder producing one `fmt` object of `sample_rate` Hz mono audio; with
    `total_samples`, the object's headers state that exact count (it is then an error to
    feed any other number of samples)."""
    if fmt is AudioFormat.PCM:
        return PcmEncoder(sample_rate)
    if fmt is AudioFormat.WAV:
        return WavEncoder(sample_rate, total_samples)
    if fmt is AudioFormat.FLAC:
        post = _FlacTotalSamples(total_samples) if total_samples is not None else None
        return SndfileEncoder(fmt, sample_rate, "FLAC", "PCM_16", post=post)
    if fmt is AudioFormat.MP3:
        kbps = MP3_KBPS_MPEG1 if sample_rate >= 32000 else MP3_KBPS_LSF
        return SndfileEncoder(
            fmt,
            sample_rate,
            "MP3",
            "MPEG_LAYER_III",
            options={
                "compression_level": mp3_compression_level(sample_rate, kbps),
                "bitrate_mode": "CONSTANT",
            },
            post=_Mp3InfoFrameCutter(),
        )
    if fmt is AudioFormat.AAC:
        from nearvoice.edge.synth.aac import AacEncoder  # PyAV loads FFmpeg: only when asked for

        return AacEncoder(sample_rate)
    if fmt is AudioFormat.OPUS:
        from nearvoice.edge.synth.opus import OpusEncoder, opus_rate  # PyAV: only when asked for

        # Opus codes only some rates; other voices are resampled to the next one up, so
        # piper's 22.05 kHz becomes 24 kHz.
        rate = opus_rate(sample_rate)
        if rate == sample_rate:
            return OpusEncoder(rate, total_samples=total_samples)
        coded = (
            None
            if total_samples is None
            else Resampler(sample_rate, rate).output_count(total_samples)
        )
        opus = OpusEncoder(rate, input_rate=sample_rate, total_samples=coded)
        return ResamplingEncoder(opus, sample_rate, rate)
    raise ValueError(f"no encoder for {fmt!r}")


def encoded_length(fmt: AudioFormat, sample_rate: int, total_samples: int) -> int | None:
    """The exact byte length of a `fmt` object of `total_samples` samples, where the format
    makes it a function of the count (WAV, PCM, constant-bitrate MP3, constant-bitrate Ogg
    Opus); None otherwise."""
    if fmt is AudioFormat.PCM:
        return 2 * total_samples
    if fmt is AudioFormat.WAV:
        return WAV_HEADER_BYTES + 2 * total_samples
    if fmt is AudioFormat.MP3:
        return mp3_length(sample_rate, total_samples)
    if fmt is AudioFormat.OPUS:
        from nearvoice.edge.synth.opus import opus_length, opus_rate

        rate = opus_rate(sample_rate)
        if rate != sample_rate:
            total_samples = Resampler(sample_rate, rate).output_count(total_samples)
        return opus_length(rate, total_samples)
    return None


MP3_LSF_FRAME_SAMPLES = 576
"""Samples per MPEG-2/2.5 Layer III frame (ISO/IEC 13818-3)."""
MP3_LAME_EXTRA_FRAMES = 2
"""Frames LAME writes beyond ceil(samples / 576): its encoder delay (576 + 529 samples)
and the flush of the last granule, measured for every count (tests/test_streaming.py)."""


def mp3_length(sample_rate: int, total_samples: int) -> int | None:
    """Bytes LAME writes for `total_samples` at the constant bitrate `stream_encoder`
    uses, for the MPEG-2/2.5 rates (below 32 kHz, where no Info frame is reserved);
    None for MPEG-1 rates, whose reserved-and-cut Info frame this does not model.

    A frame holds 72 * bitrate / rate bytes; where that is not whole, LAME pads frames
    with one byte so the average stays exact: it subtracts the remainder from a running
    "slot lag" started at the remainder and pads each frame that takes it below zero
    (lame's `getframebits`), so k frames get ceil((k - 1) * remainder / rate) pads."""
    if sample_rate >= 32000 or total_samples < 0:
        return None
    if total_samples == 0:
        return 0
    frames = -(-total_samples // MP3_LSF_FRAME_SAMPLES) + MP3_LAME_EXTRA_FRAMES
    whole, remainder = divmod(72 * MP3_KBPS_LSF * 1000, sample_rate)
    pads = -(-(frames - 1) * remainder // sample_rate)
    return frames * whole + pads


class ResamplingEncoder:
    """Feeds another encoder at a rate its codec accepts."""

    def __init__(self, inner: StreamEncoder, source_rate: int, target_rate: int) -> None:
        self._inner = inner
        self._resampler = Resampler(source_rate, target_rate)
        self.content_type = inner.content_type

    def feed(self, audio: Audio) -> bytes:
        return self._inner.feed(self._resampler.process(audio))

    def finish(self) -> bytes:
        return self._inner.feed(self._resampler.flush()) + self._inner.finish()


def to_pcm16(audio: Audio) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


WAV_HEADER_BYTES = 44


def wav_header(sample_rate: int, total_samples: int | None = None) -> bytes:
    """RIFF/WAVE header for PCM s16le mono: of exactly `total_samples`, or of unknown
    length. (A count whose data would not fit the 32-bit sizes is written as unknown.)"""
    data = _UNKNOWN_SIZE if total_samples is None else 2 * total_samples
    riff = _UNKNOWN_SIZE if total_samples is None else WAV_HEADER_BYTES - 8 + data
    if riff > _UNKNOWN_SIZE:
        data = riff = _UNKNOWN_SIZE
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
        + b"data"
        + struct.pack("<I", data)
    )


def mp3_compression_level(sample_rate: int, kbps: int) -> float:
    """The libsndfile compression level that makes LAME's CBR bitrate `kbps`: libsndfile
    maps level 0..1 linearly onto the MPEG version's bitrate range, truncating."""
    if sample_rate >= 32000:
        top, bottom = 320.0, 32.0  # MPEG-1
    elif sample_rate >= 16000:
        top, bottom = 160.0, 8.0  # MPEG-2
    else:
        top, bottom = 64.0, 8.0  # MPEG-2.5
    if not bottom <= kbps <= top:
        raise ValueError(f"{kbps} kbps is outside {bottom:g}..{top:g} at {sample_rate} Hz")
    # Aim a hair above kbps so libsndfile's truncation to int lands on it.
    return max(0.0, (top - kbps - 1e-6) / (top - bottom))


class _Closed(RuntimeError):
    pass


class PcmEncoder:
    def __init__(self, sample_rate: int) -> None:
        self.content_type = AudioFormat.PCM.content_type(sample_rate)
        self._done = False

    def feed(self, audio: Audio) -> bytes:
        if self._done:
            raise _Closed("feed after finish")
        return to_pcm16(audio)

    def finish(self) -> bytes:
        if self._done:
            raise _Closed("finish called twice")
        self._done = True
        return b""

    def close(self) -> None:
        self._done = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WavEncoder(PcmEncoder):
    def __init__(self, sample_rate: int, total_samples: int | None = None) -> None:
        super().__init__(sample_rate)
        self.content_type = AudioFormat.WAV.content_type(sample_rate)
        self._header: bytes | None = wav_header(sample_rate, total_samples)

    def _take_header(self) -> bytes:
        header, self._header = self._header, None
        return header or b""

    def feed(self, audio: Audio) -> bytes:
        body = super().feed(audio)
        return self._take_header() + body

    def finish(self) -> bytes:
        super().finish()
        return self._take_header()


class _Sink:
    """The file libsndfile writes: append-only underneath a seekable surface.

    `take` hands out everything written since the last `take`; from then on those
    bytes are fixed. Writes that fall entirely on handed-out bytes (header patches on
    close) are dropped and counted in `dropped`. Errors are recorded, never raised,
    because this runs inside libsndfile callbacks."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._sent = 0
        self._pos = 0
        self.dropped: list[tuple[int, int]] = []  # (offset, length) of dropped writes
        self.error: str | None = None

    # -- the file interface soundfile's virtual IO uses --------------------------------

    def write(self, data: bytes) -> int:
        n = len(data)
        start, end = self._pos, self._pos + n
        if end <= self._sent:
            self.dropped.append((start, n))
        elif start < self._sent:
            self.error = f"write of {n} bytes at {start} straddles handed-out byte {self._sent}"
        else:
            if start > len(self._data):
                self._data.extend(bytes(start - len(self._data)))
            self._data[start:end] = data
        self._pos = end
        return n

    def read(self, size: int = -1) -> bytes:
        start = self._pos
        end = len(self._data) if size < 0 else min(len(self._data), start + size)
        if start < self._sent:
            self.error = f"read at {start} of bytes already handed out"
        chunk = bytes(self._data[start:end])
        self._pos = max(start, end)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    # -- ours ----------------------------------------------------------------------------

    def take(self) -> bytes:
        with memoryview(self._data) as view:
            out = bytes(view[self._sent :])
        self._sent = len(self._data)
        return out


class _Post(Protocol):
    def push(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _FlacTotalSamples:
    """Writes the total sample count into the STREAMINFO block libFLAC wrote as unknown
    (0), before those bytes are handed out. STREAMINFO is the first metadata block,
    right after the 4-byte "fLaC" marker and its 4-byte block header; its total-samples
    field is 36 bits starting at the low nibble of its 14th byte (RFC 9639 section 8.2)."""

    _FIELD = 4 + 4 + 13  # file offset of the byte holding the field's top 4 bits
    _HEAD = _FIELD + 5

    def __init__(self, total_samples: int) -> None:
        if not 0 <= total_samples < 1 << 36:
            raise ValueError(f"FLAC cannot state {total_samples} samples")
        self._total = total_samples
        self._head: bytearray | None = bytearray()

    def push(self, data: bytes) -> bytes:
        if self._head is None:
            return data
        self._head += data
        if len(self._head) < self._HEAD:
            return b""
        return self._patched()

    def finish(self) -> bytes:
        return b"" if self._head is None else self._patched()

    def _patched(self) -> bytes:
        head, self._head = self._head, None
        assert head is not None
        if len(head) >= self._HEAD and head[:4] == b"fLaC" and head[4] & 0x7F == 0:
            at, total = self._FIELD, self._total
            head[at] = (head[at] & 0xF0) | (total >> 32)
            head[at + 1 : at + 5] = (total & 0xFFFFFFFF).to_bytes(4, "big")
        return bytes(head)


# MPEG audio Layer III: kbps by bitrate index, Hz by sample-rate index, per version.
_L3_KBPS = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frame_length(header: bytes) -> int | None:
    """Bytes in the MPEG Layer III frame whose 4-byte header this is, or None if it is
    not one."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version = (header[1] >> 3) & 3  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5, 1: reserved
    layer = (header[1] >> 1) & 3  # 1: Layer III
    kbps_index, rate_index = header[2] >> 4, (header[2] >> 2) & 3
    if version == 1 or layer != 1 or kbps_index in (0, 15) or rate_index == 3:
        return None
    kbps = _L3_KBPS[1 if version == 3 else 2][kbps_index]
    per_kbps = 144 if version == 3 else 72  # bytes per kbps per Hz: 1152 or 576 samples / 8
    padding = (header[2] >> 1) & 1
    return per_kbps * kbps * 1000 // _RATES[version][rate_index] + padding


class _Mp3InfoFrameCutter:
    """Cuts LAME's reserved Info-tag frame (a frame header followed by zeros) from the
    start of the stream; passes everything after it through."""

    def __init__(self) -> None:
        self._head: bytearray | None = bytearray()  # None once the first frame is decided

    def push(self, data: bytes) -> bytes:
        if self._head is None:
            return data
        self._head += data
        if len(self._head) < 4:
            return b""
        length = mp3_frame_length(bytes(self._head[:4]))
        if length is not None and len(self._head) < length:
            return b""
        head, self._head = bytes(self._head), None
        if length is not None and not any(head[4:length]):
            return head[length:]
        return head

    def finish(self) -> bytes:
        if self._head is None:
            return b""
        head, self._head = bytes(self._head), None
        length = mp3_frame_length(head[:4])
        if length is not None and len(head) == length and not any(head[4:]):
            return b""
        return head


class SndfileEncoder:
    """One libsndfile encoder writing into a `_Sink`, its output optionally rewritten
    by `post` (FLAC STREAMINFO total, MP3 Info-frame cutting)."""

    def __init__(
        self,
        fmt: AudioFormat,
        sample_rate: int,
        container: str,
        subtype: str,
        *,
        options: dict[str, Any] | None = None,
        setup: Callable[[Any], None] | None = None,
        post: _Post | None = None,
    ) -> None:
        self.content_type = fmt.content_type(sample_rate)
        self._sink = _Sink()
        self._post = post
        self._sf: Any = soundfile.SoundFile(
            self._sink,
            mode="w",
            samplerate=sample_rate,
            channels=1,
            format=container,
            subtype=subtype,
            **(options or {}),
        )
        try:
            if setup is not None:
                setup(self._sf)
        except BaseException:
            self.close()
            raise

    @property
    def dropped_writes(self) -> list[tuple[int, int]]:
        """(offset, length) of each write libsndfile made to bytes already handed out."""
        return list(self._sink.dropped)

    def feed(self, audio: Audio) -> bytes:
        if self._sf is None:
            raise _Closed("feed after finish or close")
        if len(audio):
            self._sf.write(np.asarray(audio, dtype=np.float32))
            # libsndfile writes through to the sink (flush() is an fsync, a no-op on a
            # virtual file); what the codec still holds is codec framing, not buffering.
        return self._take()

    def finish(self) -> bytes:
        if self._sf is None:
            raise _Closed("finish after finish or close")
        sf, self._sf = self._sf, None
        sf.close()
        out = self._take()
        return out + self._post.finish() if self._post is not None else out

    def close(self) -> None:
        """Releases libsndfile without finishing the object (idempotent)."""
        sf, self._sf = self._sf, None
        if sf is not None:
            sf.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self) -> bytes:
        if self._sink.error is not None:
            self.close()
            raise RuntimeError(f"libsndfile broke the append-only contract: {self._sink.error}")
        data = self._sink.take()
        return self._post.push(data) if self._post is not None else data
