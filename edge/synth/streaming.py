"""Streaming encoders: float32 mono audio in, sentence by sentence; delivery-format bytes out.

Every byte an encoder returns is final. The concatenation of everything `feed` and
`finish` return is the object, so a client that streams an object while it is rendered
receives a prefix of the final bytes (DESIGN.md section 2), and a complete render is just
`feed(all) + finish()` through this same code (edge.synth.encode).

Formats whose header normally records the length are therefore written as streams of
unknown length:

WAV   written here, not by libsndfile: a 44-byte RIFF/WAVE header for PCM s16le mono whose
      RIFF and data chunk sizes are 0xFFFFFFFF, the conventional "unknown, streaming"
      value, then the samples. libsndfile (python-soundfile) and ffmpeg take the data
      chunk to run to the end of the file and read every sample, and ffprobe derives
      the duration from the file size (tests/test_streaming.py checks each). A size of
      0, the other streaming convention, would not do: libsndfile reads zero frames.
PCM   raw s16le; no header at all.
FLAC  libsndfile/libFLAC. On close libFLAC seeks back to patch STREAMINFO (minimum and
      maximum frame size, total samples, MD5); those writes land on bytes already handed
      out and are dropped, leaving the values libFLAC wrote first: 0, which the FLAC
      format defines as "unknown". ffmpeg and libFLAC decode such streams completely.
      Caveat: python-soundfile's `read` cannot: libsndfile reports an unknown length as
      SF_COUNT_MAX frames, and soundfile seeks after every read, which libFLAC refuses
      without a sample count. libsndfile itself (sf_readf_*) reads every sample.
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
OPUS  libsndfile/libopus in Ogg. Nothing is rewritten, but libsndfile picks a random
      stream serial, so pages pass through edge.synth.ogg.SerialPinner (fixed serial,
      recomputed CRC, complete pages only). libsndfile holds audio until an Ogg page
      spans its page latency, 1 s by default; it is set to 200 ms here so a sentence's
      audio reaches the player with that sentence (about 2% more bytes). Opus takes 8,
      12, 16, 24 and 48 kHz only; libsndfile refuses other rates (it does not resample).
AAC   ADTS through PyAV (FFmpeg's aac encoder and adts muxer): edge.synth.aac.

libsndfile writes into `_Sink`, an append-only file it believes it can seek in: bytes
not yet handed out may still be patched, writes entirely inside what was handed out are
dropped, and anything else (a write straddling the mark, a read of handed-out bytes) is
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

from edge.formats import AudioFormat
from edge.synth.engine import Audio
from edge.synth.ogg import SerialPinner
from edge.synth.resample import Resampler

OGG_SERIAL = 0x6E766F78  # b"nvox": fixed so renders are byte-identical (see edge.synth.ogg)
OGG_PAGE_LATENCY_MS = 200.0
MP3_KBPS_LSF = 48  # MPEG-2/2.5 (sample rates below 32 kHz)
MP3_KBPS_MPEG1 = 64  # MPEG-1 (32 kHz and up)

_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302  # sndfile.h; soundfile does not wrap this command
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


def stream_encoder(fmt: AudioFormat, sample_rate: int) -> StreamEncoder:
    """A fresh encoder producing one `fmt` object of `sample_rate` Hz mono audio."""
    if fmt is AudioFormat.PCM:
        return PcmEncoder(sample_rate)
    if fmt is AudioFormat.WAV:
        return WavEncoder(sample_rate)
    if fmt is AudioFormat.FLAC:
        return SndfileEncoder(fmt, sample_rate, "FLAC", "PCM_16")
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
        from edge.synth.aac import AacEncoder  # PyAV loads FFmpeg: only when asked for

        return AacEncoder(sample_rate)
    if fmt is AudioFormat.OPUS:
        # Opus codes only these rates (RFC 6716 section 2); other voices are resampled to
        # the next one up, so piper's 22.05 kHz becomes 24 kHz.
        rate = next((r for r in OPUS_RATES if r >= sample_rate), OPUS_RATES[-1])
        opus = SndfileEncoder(
            fmt,
            rate,
            "OGG",
            "OPUS",
            setup=_set_ogg_page_latency,
            post=_OggPinning(SerialPinner(OGG_SERIAL)),
        )
        return opus if rate == sample_rate else ResamplingEncoder(opus, sample_rate, rate)
    raise ValueError(f"no encoder for {fmt!r}")


OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


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


def wav_header(sample_rate: int) -> bytes:
    """RIFF/WAVE header for PCM s16le mono of unknown length."""
    return (
        b"RIFF"
        + struct.pack("<I", _UNKNOWN_SIZE)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
        + b"data"
        + struct.pack("<I", _UNKNOWN_SIZE)
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
    def __init__(self, sample_rate: int) -> None:
        super().__init__(sample_rate)
        self.content_type = AudioFormat.WAV.content_type(sample_rate)
        self._header: bytes | None = wav_header(sample_rate)

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


class _OggPinning:
    def __init__(self, pinner: SerialPinner) -> None:
        self._pinner = pinner

    def push(self, data: bytes) -> bytes:
        return self._pinner.push(data)

    def finish(self) -> bytes:
        return self._pinner.finish()


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


def _set_ogg_page_latency(sf: Any) -> None:
    latency = soundfile._ffi.new("double*", OGG_PAGE_LATENCY_MS)
    # libsndfile 1.2 returns 0 (SF_FALSE) for this command even when it applies it, so
    # the return value says nothing; tests check the page spacing instead.
    soundfile._snd.sf_command(
        sf._file, _SFC_SET_OGG_PAGE_LATENCY_MS, latency, soundfile._ffi.sizeof("double")
    )


class SndfileEncoder:
    """One libsndfile encoder writing into a `_Sink`, its output optionally rewritten
    by `post` (Ogg serial pinning, MP3 Info-frame cutting)."""

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
