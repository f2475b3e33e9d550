"""The Ogg Opus streaming encoder: Opus (RFC 6716) in constant-size packets, in Ogg pages
(RFC 3533, RFC 7845) of a fixed number of packets, so an object's byte length follows from
its sample count (`opus_length`) and a node can state it before the first byte
(docs/contracts.md#exact-length-from-the-first-byte).

It keeps the streaming encoders' contract (edge.synth.streaming): every byte returned is
final, and the same audio gives the same bytes whatever pieces it is fed in.

* Codec: libopus through PyAV (FFmpeg's `libopus` wrapper, as PyAV ships it; the PyAV
  version is pinned in pyproject.toml), in hard CBR (`vbr=off`): every 20 ms packet is
  exactly OPUS_BITRATE * 20 ms / 8 bits = `PACKET_BYTES` bytes, silence or not (libopus
  pads a packet that needs fewer bits). The input is cut here into whole 20 ms frames, so
  the chunking of the input does not reach the codec. libopus codes 8, 12, 16, 24 and
  48 kHz (RFC 6716 section 2); edge.synth.streaming resamples other rates to the next one
  up (piper's 22.05 kHz to 24 kHz).
* Muxing is done here, not by FFmpeg's ogg muxer, whose paging follows durations and
  flushes and whose OpusTags carry FFmpeg's version: page 0 holds the OpusHead, page 1 the
  OpusTags (RFC 7845 section 5), then every audio page holds `PACKETS_PER_PAGE` packets
  (200 ms), the last one whatever remains (1 to `PACKETS_PER_PAGE`). Every page carries
  `OGG_SERIAL` (renders are byte-identical on every node) and no packet spans pages.
* Granule positions (RFC 7845 section 4) count 48 kHz samples including the pre-skip:
  a page's is the number of packets completed so far times 960; the last page's is
  `PRE_SKIP` plus the object's sample count at 48 kHz, which trims the end (RFC 7845
  section 4.5), so a decoder that honours pre-skip and end trimming (ffmpeg, libopusfile
  and libsndfile; tests/test_opus.py checks each) outputs exactly the samples fed. The
  packets are as many as cover the pre-skip and the samples, `ceil((PRE_SKIP + 48 kHz
  samples) / 960)`; the input is padded with silence to fill them, and the trimmed tail
  is less than one packet.
* Streaming: a page leaves as soon as its packets are coded. A page completed while audio
  is still being fed is never the last one (there is always at least the packet covering
  the pre-skip still to come), so only the last page waits for `finish`; audio reaches
  the listener in 200 ms pages (what libsndfile's page latency was set to before).
* What "exact" means: the object decodes to exactly the samples it was fed, at its coding
  rate, times 48 kHz over that rate, since Opus decoders output 48 kHz (ffmpeg reports
  every Ogg Opus stream at 48 kHz): `samples` at 24 kHz decode to 2 * `samples`, aligned
  with the input. A 22.05 kHz voice is first resampled to 24 kHz by edge.synth.resample,
  whose output count (`Resampler.output_count`) includes the filter's tail: N samples
  at 22.05 kHz decode to 2 * ceil((N + 13) * 160 / 147) samples at 48 kHz, 0.6 ms more
  than N / 22050 s: the input, delayed by the filter's 0.54 ms, then the filter's tail.
* Determinism: the same audio gives the same bytes from the same build (tests check).
  libopus codes in floating point and picks its SIMD routines by CPU at run time, so
  nodes on different CPU families may code different bits, as libsndfile's libopus
  could before; the length never depends on them.
"""

from __future__ import annotations

import struct
from typing import Self

import av
import numpy as np

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.ogg import (
    BEGINNING_OF_STREAM,
    END_OF_STREAM,
    OGG_SERIAL,
    ogg_page,
    page_length,
)

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
"""The rates libopus codes (RFC 6716 section 2)."""
OPUS_BITRATE = 32_000
"""Bits per second of Opus, constant: fullband speech is near transparent from about
28 kbit/s mono; 32 kbit/s codes the 24 kHz voices at their full 12 kHz bandwidth."""
FRAME_MS = 20
"""Milliseconds of audio per packet: Opus's default frame, and its most efficient."""
PACKET_BYTES = OPUS_BITRATE * FRAME_MS // 1000 // 8
"""Bytes in every packet: 80 at 32 kbit/s."""
PACKETS_PER_PAGE = 10
"""Packets on every audio page but the last: 200 ms of audio, 37 bytes of page header."""
OPUS_CLOCK = 48000
"""Hz: granule positions and pre-skip count 48 kHz samples (RFC 7845 section 4)."""
PACKET_GRANULES = OPUS_CLOCK * FRAME_MS // 1000
"""48 kHz samples per packet: 960."""
PRE_SKIP = 312
"""48 kHz samples of libopus's look-ahead (6.5 ms, the same at every coding rate) that the
decoder drops from the start; the encoder checks that libopus reports this value."""
VENDOR = b"nearvoice (libopus, constant bitrate)"
"""The OpusTags vendor string (RFC 7845 section 5.2)."""


def opus_rate(sample_rate: int) -> int:
    """The rate a `sample_rate` voice is coded at: its own where Opus codes it, else the
    next one up (48 kHz above that)."""
    return next((r for r in OPUS_RATES if r >= sample_rate), OPUS_RATES[-1])


def packet_count(sample_rate: int, samples: int) -> int:
    """Packets coding `samples` at `sample_rate` (one of OPUS_RATES), pre-skip included."""
    return -(-(PRE_SKIP + samples * (OPUS_CLOCK // sample_rate)) // PACKET_GRANULES)


def opus_length(sample_rate: int, samples: int) -> int:
    """Bytes of the Ogg Opus object of `samples` samples coded at `sample_rate` (one of
    OPUS_RATES): the two header pages, then the packets, paged `PACKETS_PER_PAGE` at a
    time. (edge.synth.streaming.encoded_length resamples other rates first.)"""
    if sample_rate not in OPUS_RATES:
        raise ValueError(f"Opus does not code {sample_rate} Hz")
    if samples < 0:
        raise ValueError(f"{samples} samples")
    full, rest = divmod(packet_count(sample_rate, samples), PACKETS_PER_PAGE)
    audio = full * page_length([PACKET_BYTES] * PACKETS_PER_PAGE)
    if rest:
        audio += page_length([PACKET_BYTES] * rest)
    return len(_headers(sample_rate)) + audio


def opus_head(input_rate: int) -> bytes:
    """The identification header (RFC 7845 section 5.1): version 1, mono, `PRE_SKIP`, the
    input's rate (informational), no output gain, channel mapping family 0."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, 1, PRE_SKIP, input_rate, 0, 0)


def opus_tags() -> bytes:
    """The comment header (RFC 7845 section 5.2): the vendor string and no comments."""
    return b"OpusTags" + struct.pack("<I", len(VENDOR)) + VENDOR + struct.pack("<I", 0)


def _headers(input_rate: int) -> bytes:
    head = ogg_page(
        [opus_head(input_rate)],
        serial=OGG_SERIAL,
        sequence=0,
        granule=0,
        flags=BEGINNING_OF_STREAM,
    )
    return head + ogg_page([opus_tags()], serial=OGG_SERIAL, sequence=1, granule=0)


class OpusEncoder:
    """Ogg Opus of `sample_rate` Hz mono audio (one of OPUS_RATES). `input_rate` is the
    rate the audio had before it was resampled for Opus, for the OpusHead; with
    `total_samples`, `finish` checks that exactly that many were fed."""

    def __init__(
        self,
        sample_rate: int,
        *,
        input_rate: int | None = None,
        total_samples: int | None = None,
    ) -> None:
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"Opus does not code {sample_rate} Hz")
        self.content_type = AudioFormat.OPUS.content_type(sample_rate)
        self._rate = sample_rate
        self._frame = sample_rate * FRAME_MS // 1000
        self._headers: bytes | None = _headers(input_rate or sample_rate)
        self._total = total_samples
        self._fed = 0  # samples fed
        self._pending = np.zeros(0, np.float32)  # fed, not yet a whole frame
        self._coded = 0  # frames coded
        self._packets: list[bytes] = []  # coded, not yet paged
        self._sequence = 2  # the next audio page's (0 and 1 are the headers)
        self._paged = 0  # packets on pages handed out
        codec = av.CodecContext.create("libopus", "w")
        assert isinstance(codec, av.AudioCodecContext)
        codec.sample_rate = sample_rate
        codec.layout = "mono"
        codec.format = "flt"
        codec.bit_rate = OPUS_BITRATE
        codec.options = {
            "vbr": "off",  # hard CBR: every packet PACKET_BYTES
            "application": "audio",  # faithful to the input, rather than voip's speech shaping
            "frame_duration": str(FRAME_MS),
        }
        codec.open()
        extradata = codec.extradata or b""
        pre_skip = struct.unpack_from("<H", extradata, 10)[0] if len(extradata) >= 12 else None
        if codec.frame_size != self._frame or pre_skip != PRE_SKIP:
            raise RuntimeError(
                f"libopus codes {codec.frame_size}-sample frames with a pre-skip of "
                f"{pre_skip}; this muxer needs {self._frame} and {PRE_SKIP}"
            )
        self._codec: av.AudioCodecContext | None = codec

    def feed(self, audio: Audio) -> bytes:
        if self._codec is None:
            raise RuntimeError("feed after finish or close")
        samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
        self._fed += len(samples)
        self._pending = np.concatenate((self._pending, samples))
        self._code_whole_frames()
        # Never the last page: at least the packet covering the pre-skip is still to come.
        out = self._take_headers()
        while len(self._packets) >= PACKETS_PER_PAGE:
            out += self._page(PACKETS_PER_PAGE)
        return out

    def finish(self) -> bytes:
        if self._codec is None:
            raise RuntimeError("finish after finish or close")
        if self._total is not None and self._fed != self._total:
            self.close()
            raise ValueError(f"fed {self._fed} samples; the object was sized for {self._total}")
        packets = packet_count(self._rate, self._fed)
        padding = (packets - self._coded) * self._frame - len(self._pending)
        self._pending = np.concatenate((self._pending, np.zeros(padding, np.float32)))
        self._code_whole_frames()
        self.close()
        assert self._coded == packets and not len(self._pending)
        out = self._take_headers()
        while len(self._packets) > PACKETS_PER_PAGE:
            out += self._page(PACKETS_PER_PAGE)
        if self._packets:
            end = PRE_SKIP + self._fed * (OPUS_CLOCK // self._rate)
            out += self._page(len(self._packets), granule=end, flags=END_OF_STREAM)
        return out

    def close(self) -> None:
        """Releases the codec without finishing the object (idempotent)."""
        self._codec = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_headers(self) -> bytes:
        headers, self._headers = self._headers, None
        return headers or b""

    def _code_whole_frames(self) -> None:
        assert self._codec is not None
        whole = len(self._pending) // self._frame * self._frame
        for start in range(0, whole, self._frame):
            piece = self._pending[start : start + self._frame].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
            frame.sample_rate = self._rate
            frame.pts = self._coded * self._frame
            for packet in self._codec.encode(frame):
                data = bytes(packet)
                if len(data) != PACKET_BYTES:
                    raise RuntimeError(f"libopus coded a {len(data)}-byte packet in CBR")
                self._packets.append(data)
            self._coded += 1
        self._pending = self._pending[whole:]
        if len(self._packets) + self._paged != self._coded:
            raise RuntimeError("libopus held a frame back: one frame must give one packet")

    def _page(self, count: int, *, granule: int | None = None, flags: int = 0) -> bytes:
        packets, self._packets = self._packets[:count], self._packets[count:]
        self._paged += count
        page = ogg_page(
            packets,
            serial=OGG_SERIAL,
            sequence=self._sequence,
            granule=self._paged * PACKET_GRANULES if granule is None else granule,
            flags=flags,
        )
        self._sequence += 1
        return page
