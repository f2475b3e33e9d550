"""edge/synth/streaming.py: encoders whose every returned byte is final."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.ogg import ogg_crc
from nearvoice.edge.synth.opus import PACKETS_PER_PAGE, OpusEncoder
from nearvoice.edge.synth.streaming import (
    OGG_SERIAL,
    SndfileEncoder,
    StreamEncoder,
    _Sink,
    mp3_compression_level,
    mp3_frame_length,
    stream_encoder,
    to_pcm16,
)

RATE = 24000
SENTENCES = (1.5, 2.0, 0.7)  # seconds of audio per feed, as an engine yields them
ALL = list(AudioFormat)
FILES = [f for f in AudioFormat if f is not AudioFormat.PCM]
LOSSLESS = [AudioFormat.WAV, AudioFormat.FLAC]
LOSSY = [AudioFormat.MP3, AudioFormat.OPUS]
CODEC = {
    AudioFormat.WAV: "pcm_s16le",
    AudioFormat.FLAC: "flac",
    AudioFormat.MP3: "mp3",
    AudioFormat.OPUS: "opus",
    AudioFormat.AAC: "aac",
}
DECODED_RATE_FACTOR = {AudioFormat.OPUS: 2}  # ffmpeg decodes Opus at 48 kHz
# MP3 without an Info tag decodes with LAME's encoder delay (1105 samples) and the last
# frame's padding in front and behind; Opus trims both through its pre-skip and granules.
PADDING = 2000


def test_ffmpeg_is_installed() -> None:
    # The decoding checks below need Debian's ffmpeg; `make sysdeps` installs it. A missing
    # peer is a failure, never a skip.
    assert shutil.which("ffmpeg") and shutil.which("ffprobe"), "run `make sysdeps`"


def speech(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Voiced-speech-like test audio: a gliding harmonic series under a syllable
    envelope, with a little noise."""
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * voiced * envelope + 0.01 * noise).astype(np.float32)


def sentences(rate: int = RATE) -> list[np.ndarray]:
    return [speech(s, rate, seed=i) for i, s in enumerate(SENTENCES)]


def stream(fmt: AudioFormat, chunks: list[np.ndarray], rate: int = RATE) -> list[bytes]:
    """What each feed and the finish return, in order."""
    encoder = stream_encoder(fmt, rate)
    return [encoder.feed(chunk) for chunk in chunks] + [encoder.finish()]


def sndfile_decode(data: bytes) -> tuple[np.ndarray, int]:
    """Every sample libsndfile decodes from `data`. Read without seeking: python-soundfile's
    read() seeks after each block, which libFLAC refuses in a FLAC stream of unknown
    length (see edge.synth.streaming)."""
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        buf = np.empty(4096, np.float32)
        ptr = soundfile._ffi.from_buffer("float[]", buf)
        blocks = []
        while (n := soundfile._snd.sf_readf_float(f._file, ptr, len(buf))) > 0:
            blocks.append(buf[:n].copy())
        samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
        return samples, f.samplerate


def ffprobe(path: Path) -> dict[str, str]:
    out = subprocess.run(
        [
            "ffprobe",
            *("-v", "error"),
            *("-show_entries", "stream=codec_name,sample_rate,channels"),
            *("-of", "default=noprint_wrappers=1"),
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def ffmpeg_decode(path: Path) -> np.ndarray:
    """All samples ffmpeg decodes, at the stream's native rate, with no errors logged."""
    proc = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-"],
        check=True,
        capture_output=True,
    )
    assert proc.stderr == b""
    return np.frombuffer(proc.stdout, "<i2").astype(np.float32) / 32768


def aligned_correlation(decoded: np.ndarray, original: np.ndarray, max_lag: int) -> float:
    """The best normalized correlation of `original` with `decoded` delayed 0..max_lag."""
    n = len(original) + max_lag
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(decoded[:n], size) * np.conj(np.fft.rfft(original, size))
    lags = np.fft.irfft(spectrum, size)[: max_lag + 1]
    lag = int(np.argmax(lags))
    seg = decoded[lag : lag + len(original)]
    m = min(len(seg), len(original))
    return float(np.corrcoef(seg[:m], original[:m])[0, 1])


def ogg_pages(data: bytes) -> list[bytes]:
    pages, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS"
        nsegs = data[pos + 26]
        end = pos + 27 + nsegs + sum(data[pos + 27 : pos + 27 + nsegs])
        pages.append(data[pos:end])
        pos = end
    return pages


def granule(page: bytes) -> int:
    return int(struct.unpack_from("<q", page, 6)[0])


def mp3_frames(data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(data):
        length = mp3_frame_length(data[pos : pos + 4])
        assert length is not None, f"no MPEG frame at byte {pos}"
        frames.append(data[pos : pos + length])
        pos += length
    return frames


# -- the API -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL)
def test_content_type_is_the_formats(fmt: AudioFormat) -> None:
    encoder: StreamEncoder = stream_encoder(fmt, RATE)
    assert encoder.content_type == fmt.content_type(RATE)
    encoder.finish()


@pytest.mark.parametrize("fmt", ALL)
def test_feed_after_finish_raises(fmt: AudioFormat) -> None:
    encoder = stream_encoder(fmt, RATE)
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.feed(speech(0.1))


@pytest.mark.parametrize("fmt", ALL)
def test_finish_twice_raises(fmt: AudioFormat) -> None:
    encoder = stream_encoder(fmt, RATE)
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.finish()


@pytest.mark.parametrize("fmt", [AudioFormat.FLAC, AudioFormat.MP3, AudioFormat.OPUS])
def test_closing_an_abandoned_encoder_releases_it(fmt: AudioFormat) -> None:
    encoder = stream_encoder(fmt, RATE)
    assert isinstance(encoder, SndfileEncoder | OpusEncoder)
    with encoder:
        encoder.feed(speech(0.5))
    with pytest.raises(RuntimeError):
        encoder.finish()


# -- the prefix property -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL)
def test_every_running_prefix_is_a_prefix_of_the_object(fmt: AudioFormat) -> None:
    parts = stream(fmt, sentences())
    final = b"".join(parts)
    received = b""
    for part in parts:
        received += part
        assert final.startswith(received)
    assert received == final


@pytest.mark.parametrize("fmt", ALL)
def test_first_feed_of_a_sentence_returns_bytes(fmt: AudioFormat) -> None:
    encoder = stream_encoder(fmt, RATE)
    assert len(encoder.feed(speech(1.5))) > 0
    encoder.finish()


@pytest.mark.parametrize("fmt", FILES)
def test_first_feed_alone_decodes_to_most_of_the_sentence(fmt: AudioFormat, tmp_path: Path) -> None:
    # What a player holds after the first sentence: it can start playing.
    encoder = stream_encoder(fmt, RATE)
    first = encoder.feed(speech(1.5))
    encoder.finish()
    path = tmp_path / f"first.{fmt.value}"
    path.write_bytes(first)
    seconds = len(ffmpeg_decode(path)) / (RATE * DECODED_RATE_FACTOR.get(fmt, 1))
    assert seconds >= 1.0


@pytest.mark.parametrize("fmt", ALL)
def test_same_chunks_give_identical_bytes(fmt: AudioFormat) -> None:
    assert stream(fmt, sentences()) == stream(fmt, sentences())


# -- decoding: libsndfile ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", LOSSLESS)
def test_lossless_stream_decodes_to_every_sample(fmt: AudioFormat) -> None:
    chunks = sentences()
    audio = np.concatenate(chunks)
    samples, rate = sndfile_decode(b"".join(stream(fmt, chunks)))
    assert rate == RATE
    assert len(samples) == len(audio)
    assert np.max(np.abs(samples - audio)) < 2 / 32767


@pytest.mark.parametrize("fmt", LOSSY)
def test_lossy_stream_decodes_within_codec_padding(fmt: AudioFormat) -> None:
    chunks = sentences()
    audio = np.concatenate(chunks)
    samples, rate = sndfile_decode(b"".join(stream(fmt, chunks)))
    assert rate == RATE
    assert len(audio) <= len(samples) <= len(audio) + PADDING


@pytest.mark.parametrize("fmt", LOSSY)
def test_lossy_stream_keeps_the_waveform(fmt: AudioFormat) -> None:
    chunks = sentences()
    audio = np.concatenate(chunks)
    samples, _ = sndfile_decode(b"".join(stream(fmt, chunks)))
    assert aligned_correlation(samples, audio, PADDING) > 0.9
    energy = float(np.sum(samples**2) / np.sum(audio**2))
    assert 0.8 < energy < 1.2


@pytest.mark.parametrize("fmt", [AudioFormat.WAV, AudioFormat.MP3, AudioFormat.OPUS])
def test_python_soundfile_read_decodes_the_stream(fmt: AudioFormat) -> None:
    # FLAC is the exception: see test_flac_streaminfo_leaves_length_and_md5_unknown.
    chunks = sentences()
    n = sum(len(c) for c in chunks)
    samples, rate = soundfile.read(io.BytesIO(b"".join(stream(fmt, chunks))), dtype="float32")
    assert rate == RATE
    assert n <= len(samples) <= n + PADDING


# -- decoding: ffmpeg ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FILES)
def test_ffprobe_reads_codec_and_rate(fmt: AudioFormat, tmp_path: Path) -> None:
    path = tmp_path / f"object.{fmt.value}"
    path.write_bytes(b"".join(stream(fmt, sentences())))
    info = ffprobe(path)
    assert info["codec_name"] == CODEC[fmt]
    assert int(info["sample_rate"]) == RATE * DECODED_RATE_FACTOR.get(fmt, 1)
    assert info["channels"] == "1"


@pytest.mark.parametrize("fmt", FILES)
def test_ffmpeg_decodes_every_sample(fmt: AudioFormat, tmp_path: Path) -> None:
    chunks = sentences()
    expected = sum(len(c) for c in chunks) * DECODED_RATE_FACTOR.get(fmt, 1)
    path = tmp_path / f"object.{fmt.value}"
    path.write_bytes(b"".join(stream(fmt, chunks)))
    decoded = len(ffmpeg_decode(path))
    if fmt in (AudioFormat.MP3, AudioFormat.AAC):  # ADTS carries no encoder delay either
        assert expected <= decoded <= expected + PADDING
    else:
        assert decoded == expected


@pytest.mark.parametrize("fmt", LOSSLESS)
def test_ffmpeg_and_libsndfile_decode_identical_lossless_samples(
    fmt: AudioFormat, tmp_path: Path
) -> None:
    data = b"".join(stream(fmt, sentences()))
    path = tmp_path / f"object.{fmt.value}"
    path.write_bytes(data)
    assert np.array_equal(ffmpeg_decode(path), sndfile_decode(data)[0])


# -- WAV and PCM ---------------------------------------------------------------------------


def test_wav_header_fields_are_exact() -> None:
    header = b"".join(stream(AudioFormat.WAV, sentences()))[:44]
    assert header == (
        b"RIFF\xff\xff\xff\xffWAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, RATE, 2 * RATE, 2, 16)
        + b"data\xff\xff\xff\xff"
    )


def test_wav_body_is_the_pcm_stream() -> None:
    chunks = sentences()
    wav = b"".join(stream(AudioFormat.WAV, chunks))
    assert wav[44:] == b"".join(stream(AudioFormat.PCM, chunks))


def test_wav_of_no_audio_is_its_header() -> None:
    assert len(b"".join(stream(AudioFormat.WAV, []))) == 44


def test_pcm_stream_is_s16le_of_every_feed() -> None:
    chunks = sentences()
    assert b"".join(stream(AudioFormat.PCM, chunks)) == b"".join(map(to_pcm16, chunks))


# -- FLAC ----------------------------------------------------------------------------------


def test_flac_streaminfo_leaves_length_and_md5_unknown() -> None:
    data = b"".join(stream(AudioFormat.FLAC, sentences()))
    assert data[:4] == b"fLaC"
    info = data[8:42]  # STREAMINFO body
    min_frame, max_frame = info[4:7], info[7:10]
    total_samples = int.from_bytes(info[13:18], "big") & ((1 << 36) - 1)
    assert (min_frame, max_frame, total_samples, info[18:34]) == (bytes(3), bytes(3), 0, bytes(16))


def test_flac_differs_from_libsndfile_only_in_the_fields_it_patches_on_close() -> None:
    audio = np.concatenate(sentences())
    reference = io.BytesIO()
    soundfile.write(reference, audio, RATE, format="FLAC", subtype="PCM_16")
    ref = reference.getvalue()
    ours = b"".join(stream(AudioFormat.FLAC, [audio]))
    assert len(ours) == len(ref)
    patched = set(range(12, 18)) | set(range(21, 42))  # frame sizes; total samples, MD5
    assert [i for i in range(len(ref)) if ours[i] != ref[i] and i not in patched] == []


def test_flac_close_time_patches_are_dropped() -> None:
    encoder = stream_encoder(AudioFormat.FLAC, RATE)
    assert isinstance(encoder, SndfileEncoder)
    encoder.feed(speech(1.5))
    encoder.finish()
    assert encoder.dropped_writes  # libFLAC's STREAMINFO rewrite, all inside the header
    assert all(offset + n <= 42 for offset, n in encoder.dropped_writes)


# -- MP3 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "kbps"), [(16000, 48), (22050, 48), (24000, 48), (44100, 64)])
def test_mp3_is_whole_constant_bitrate_frames(rate: int, kbps: int) -> None:
    data = b"".join(stream(AudioFormat.MP3, sentences(rate), rate))
    frames = mp3_frames(data)
    assert len(frames) > 10
    bitrate_indexes = {frame[2] >> 4 for frame in frames}
    assert len(bitrate_indexes) == 1
    samples_per_frame = 1152 if rate >= 32000 else 576
    assert len(frames[0]) in (kbps * 1000 * samples_per_frame // 8 // rate + p for p in (0, 1))


def test_mp3_reserved_info_frame_is_cut() -> None:
    # At 16 kHz a 48 kbps frame is big enough for LAME's Info tag, so LAME reserves the
    # first frame for it; the stream is libsndfile's file without that frame.
    rate = 16000
    audio = np.concatenate(sentences(rate))
    reference = io.BytesIO()
    soundfile.write(
        reference,
        audio,
        rate,
        format="MP3",
        subtype="MPEG_LAYER_III",
        compression_level=mp3_compression_level(rate, 48),
        bitrate_mode="CONSTANT",
    )
    ref = reference.getvalue()
    info_frame = mp3_frames(ref)[0]
    assert b"Info" in info_frame
    assert b"".join(stream(AudioFormat.MP3, [audio], rate)) == ref[len(info_frame) :]


def test_mp3_at_24khz_reserves_no_info_frame() -> None:
    encoder = stream_encoder(AudioFormat.MP3, RATE)
    assert isinstance(encoder, SndfileEncoder)
    data = encoder.feed(speech(1.5)) + encoder.finish()
    assert encoder.dropped_writes == []
    assert any(mp3_frames(data)[0][4:])


def test_mp3_frame_length_rejects_non_layer3_headers() -> None:
    assert mp3_frame_length(b"ID3\x04") is None
    assert mp3_frame_length(b"\xff\xfb\xf0\x00") is None  # bitrate index 15
    assert mp3_frame_length(b"\xff\xfd\x90\x00") is None  # layer II
    assert mp3_frame_length(b"\xff\xf3") is None


def test_mp3_compression_level_rejects_impossible_bitrates() -> None:
    with pytest.raises(ValueError, match="outside"):
        mp3_compression_level(24000, 320)


# -- Opus ----------------------------------------------------------------------------------


def test_opus_pages_carry_the_pinned_serial() -> None:
    pages = ogg_pages(b"".join(stream(AudioFormat.OPUS, sentences())))
    assert len(pages) > 5
    assert {struct.unpack_from("<I", page, 14)[0] for page in pages} == {OGG_SERIAL}


def test_opus_page_crcs_are_valid() -> None:
    for page in ogg_pages(b"".join(stream(AudioFormat.OPUS, sentences()))):
        zeroed = bytearray(page)
        struct.pack_into("<I", zeroed, 22, 0)
        assert ogg_crc(zeroed) == struct.unpack_from("<I", page, 22)[0]


def test_opus_feeds_return_whole_pages() -> None:
    for part in stream(AudioFormat.OPUS, sentences()):
        assert b"".join(ogg_pages(part)) == part


def test_opus_stream_begins_and_ends_properly() -> None:
    pages = ogg_pages(b"".join(stream(AudioFormat.OPUS, sentences())))
    assert pages[0][5] == 0x02  # beginning of stream
    assert pages[0][28:36] == b"OpusHead"
    assert pages[-1][5] & 0x04  # end of stream
    assert all(not page[5] & 0x04 for page in pages[:-1])


def test_opus_pages_span_a_fixed_number_of_packets() -> None:
    # 48 kHz granules: every audio page but the last holds PACKETS_PER_PAGE 20 ms packets.
    pages = ogg_pages(b"".join(stream(AudioFormat.OPUS, sentences())))
    granules = [granule(p) for p in pages[1:-1]]
    spans = np.diff(granules)
    assert len(spans) > 10
    assert set(spans.tolist()) == {PACKETS_PER_PAGE * 960}


def test_opus_first_sentence_brings_its_audio_pages() -> None:
    encoder = stream_encoder(AudioFormat.OPUS, RATE)
    pages = ogg_pages(encoder.feed(speech(1.5)))
    encoder.finish()
    # Everything but the last, incomplete page (and the pre-skip's packet) is out already.
    assert max(granule(p) for p in pages) >= (1500 - PACKETS_PER_PAGE * 20 - 20) * 48


# -- the sink ------------------------------------------------------------------------------


def test_sink_hands_out_bytes_once() -> None:
    sink = _Sink()
    sink.write(b"abc")
    assert sink.take() == b"abc"
    sink.write(b"de")
    assert sink.take() == b"de"
    assert sink.take() == b""


def test_sink_drops_rewrites_of_handed_out_bytes() -> None:
    sink = _Sink()
    sink.write(b"header--body")
    sink.take()
    sink.seek(0)
    sink.write(b"HEADER")
    sink.seek(0, 2)
    sink.write(b"tail")
    assert sink.take() == b"tail"
    assert sink.dropped == [(0, 6)]
    assert sink.error is None


def test_sink_applies_patches_to_bytes_not_yet_handed_out() -> None:
    sink = _Sink()
    sink.write(b"xxxx----")
    sink.seek(0)
    sink.write(b"HEAD")
    assert sink.take() == b"HEAD----"


def test_sink_records_a_write_straddling_the_mark() -> None:
    sink = _Sink()
    sink.write(b"abcd")
    sink.take()
    sink.seek(2)
    sink.write(b"XYZ")
    assert sink.error is not None
