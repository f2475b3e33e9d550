"""edge/synth/opus.py: Ogg Opus whose byte length follows from the sample count.

`encoded_length("opus", rate, n)` is what a node announces before the first byte; the
encoder must then write exactly that many bytes, for every count and however the audio is
fed, and decoders must play exactly the samples it was fed.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import event, given, settings
from hypothesis import strategies as st

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.ogg import OGG_SERIAL, ogg_crc
from nearvoice.edge.synth.opus import (
    OPUS_BITRATE,
    PACKET_BYTES,
    PACKETS_PER_PAGE,
    PRE_SKIP,
    VENDOR,
    OpusEncoder,
    opus_length,
    packet_count,
)
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.edge.synth.renderer import Renderer
from nearvoice.edge.synth.resample import Resampler
from nearvoice.edge.synth.streaming import encoded_length, stream_encoder
from tests.test_streaming import granule, ogg_pages, speech

OPUS = AudioFormat.OPUS
# The voices' rates (hibari 24 kHz, piper 22.05 kHz) and every other kind of rate: coded
# as is (8, 16, 48 kHz), and resampled up (44.1 kHz to 48 kHz).
RATES = [24000, 22050, 8000, 16000, 48000, 44100]


def coded(rate: int, samples: int) -> tuple[int, int]:
    """(coding rate, samples at it) for `samples` fed at `rate`."""
    target = next((r for r in (8000, 12000, 16000, 24000, 48000) if r >= rate), 48000)
    if target == rate:
        return rate, samples
    return target, Resampler(rate, target).output_count(samples)


def encode_in(audio: np.ndarray, rate: int, cuts: list[int]) -> list[bytes]:
    """What each feed (audio cut at `cuts`) and the finish return."""
    encoder = stream_encoder(OPUS, rate, len(audio))
    return [encoder.feed(piece) for piece in np.split(audio, sorted(cuts))] + [encoder.finish()]


def noise(samples: int, seed: int = 0) -> np.ndarray:
    """Full-band noise: the hardest input for a constant packet size to hold."""
    rng = np.random.default_rng(seed)
    return (0.5 * rng.standard_normal(samples)).astype(np.float32)


def packets(data: bytes) -> list[list[int]]:
    """The packet sizes on each page, from the lacing values."""
    sizes = []
    for page in ogg_pages(data):
        lacing = page[27 : 27 + page[26]]
        page_sizes, size = [], 0
        for value in lacing:
            size += value
            if value < 255:
                page_sizes.append(size)
                size = 0
        assert size == 0, "a packet continues onto the next page"
        sizes.append(page_sizes)
    return sizes


def check_pages(data: bytes, rate: int, samples: int) -> None:
    """Everything RFC 3533 and RFC 7845 ask of the pages, and our fixed paging."""
    code_rate, n = coded(rate, samples)
    pages = ogg_pages(data)
    for sequence, page in enumerate(pages):
        assert page[4] == 0  # version
        assert struct.unpack_from("<I", page, 14)[0] == OGG_SERIAL
        assert struct.unpack_from("<I", page, 18)[0] == sequence
        zeroed = bytearray(page)
        struct.pack_into("<I", zeroed, 22, 0)
        assert ogg_crc(zeroed) == struct.unpack_from("<I", page, 22)[0]
    assert [page[5] for page in pages] == [0x02] + [0] * (len(pages) - 2) + [0x04]
    head = pages[0][28:]
    assert head[:8] == b"OpusHead" and len(head) == 19
    version, channels, pre_skip, input_rate, gain, family = struct.unpack("<BBHIhB", head[8:])
    assert (version, channels, pre_skip, input_rate, gain, family) == (1, 1, PRE_SKIP, rate, 0, 0)
    assert pages[1][28:36] == b"OpusTags" and granule(pages[1]) == 0
    audio = packets(data)[2:]
    total = packet_count(code_rate, n)
    assert [len(p) for p in audio[:-1]] == [PACKETS_PER_PAGE] * (len(audio) - 1)
    assert sum(len(p) for p in audio) == total
    assert {size for page in audio for size in page} == {PACKET_BYTES}
    ends = [granule(page) for page in pages[2:]]
    assert ends[:-1] == [960 * PACKETS_PER_PAGE * (i + 1) for i in range(len(ends) - 1)]
    # End trimming: the last granule is the pre-skip plus the samples, within one packet.
    assert ends[-1] == PRE_SKIP + n * 48000 // code_rate
    assert 960 * (total - 1) < ends[-1] <= 960 * total


def ffmpeg_decoded(path: Path) -> np.ndarray:
    done = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-"],
        capture_output=True,
        check=True,
    )
    assert done.stderr == b"", done.stderr.decode(errors="replace")
    return np.frombuffer(done.stdout, "<i2")


def opusinfo(path: Path) -> str:
    done = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, check=True)
    report = done.stdout + done.stderr
    assert "WARNING" not in report and "ERROR" not in report, report
    return report


# -- the length --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    rate=st.sampled_from(RATES),
    # Tiny counts (none, under a packet, around the first packet), several pages, many.
    samples=st.one_of(st.integers(0, 1000), st.integers(1000, 20000), st.integers(20000, 150000)),
    cuts=st.lists(st.floats(0, 1), max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_announced_length_is_the_length_for_any_count_and_any_feeds(
    rate: int, samples: int, cuts: list[float], seed: int
) -> None:
    audio = noise(samples, seed)
    parts = encode_in(audio, rate, [int(c * samples) for c in cuts])
    pages = len(ogg_pages(b"".join(parts))) - 2
    event(f"{rate} Hz")
    event("0 samples" if not samples else "< 1 packet" if samples < rate // 50 else ">= 1 packet")
    event("1 audio page" if pages == 1 else "2-10 audio pages" if pages <= 10 else "> 10 pages")
    event(f"{len(cuts) + 1} feeds")
    data = b"".join(parts)
    assert len(data) == encoded_length(OPUS, rate, samples)
    # Whole pages only, every one final: what a listener has is a prefix of the object.
    for part in parts:
        assert b"".join(ogg_pages(part)) == part
    # However it is fed, the same audio gives the same bytes.
    assert data == b"".join(encode_in(audio, rate, []))
    check_pages(data, rate, samples)


@pytest.mark.parametrize("rate", [24000, 22050])
def test_the_length_holds_on_both_sides_of_every_packet_and_page_boundary(rate: int) -> None:
    code_rate, _ = coded(rate, 0)
    step = code_rate // 50
    # A packet more is needed each time the samples pass k packets less the pre-skip.
    edges = [k * step - PRE_SKIP * code_rate // 48000 for k in range(1, 2 * PACKETS_PER_PAGE + 2)]
    counts = sorted({max(0, e + d) for e in edges for d in (-1, 0, 1)} | {0, 1, 2})
    for samples in counts:
        if code_rate != rate:  # counts at the voice's rate around the resampled edges
            samples = samples * rate // code_rate
        data = b"".join(encode_in(noise(samples), rate, []))
        assert len(data) == encoded_length(OPUS, rate, samples), samples
        check_pages(data, rate, samples)


def test_bytes_per_second_are_the_bitrate_and_the_paging() -> None:
    # 200 ms pages of ten 80-byte packets, each page a 27-byte header and 10 lacing values.
    assert PACKET_BYTES == OPUS_BITRATE // 8 // 50 == 80
    page = 27 + PACKETS_PER_PAGE * (1 + PACKET_BYTES)
    assert 5 * page == 4185  # bytes per second of audio: 33.5 kbit/s
    headers = 27 + 1 + 19 + 27 + 1 + len(b"OpusTags") + 4 + len(VENDOR) + 4
    # A minute at 24 kHz: 3,000 packets and the one that covers the pre-skip.
    assert opus_length(24000, 60 * 24000) == headers + 300 * page + 27 + 1 + PACKET_BYTES


def test_the_length_refuses_what_opus_cannot_code() -> None:
    with pytest.raises(ValueError):
        opus_length(22050, 100)
    with pytest.raises(ValueError):
        opus_length(24000, -1)


@pytest.mark.parametrize(
    "audio",
    [
        np.zeros(24000, np.float32),
        np.ones(24000, np.float32),
        np.full(24000, -3.0, np.float32),
        noise(24000, 1) * 4,
        np.full(24000, 1e-9, np.float32),
    ],
    ids=["silence", "dc", "clipped", "loud-noise", "tiny"],
)
def test_every_packet_has_the_constant_size_whatever_the_audio(audio: np.ndarray) -> None:
    data = b"".join(encode_in(audio, 24000, [7000]))
    assert len(data) == encoded_length(OPUS, 24000, len(audio))
    check_pages(data, 24000, len(audio))


def test_an_announced_count_that_is_not_fed_is_an_error() -> None:
    encoder = OpusEncoder(24000, total_samples=1000)
    encoder.feed(noise(999))
    with pytest.raises(ValueError):
        encoder.finish()


def test_a_rate_opus_does_not_code_is_refused_by_the_codec_encoder() -> None:
    with pytest.raises(ValueError):
        OpusEncoder(22050)


# -- streaming ------------------------------------------------------------------------------


def test_pages_leave_as_soon_as_their_packets_are_coded() -> None:
    encoder = stream_encoder(OPUS, 24000)
    first = encoder.feed(noise(480 * (PACKETS_PER_PAGE - 1)))
    assert [len(p) for p in packets(first)] == [1, 1]  # the headers, at once
    second = encoder.feed(noise(480))  # completes the first audio page
    assert [len(p) for p in packets(second)] == [PACKETS_PER_PAGE]
    assert encoder.feed(noise(479)) == b""
    last = encoder.finish()
    assert [len(p) for p in packets(last)] == [2]  # the 479 samples, then the pre-skip's packet


# -- decoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [24000, 22050])
@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.2, 2.5])
def test_ffmpeg_decodes_exactly_the_samples_at_48khz(
    rate: int, seconds: float, tmp_path: Path
) -> None:
    samples = int(seconds * rate)
    path = tmp_path / "object.opus"
    path.write_bytes(b"".join(encode_in(speech(seconds, rate), rate, [samples // 3])))
    code_rate, n = coded(rate, samples)
    assert len(ffmpeg_decoded(path)) == n * 48000 // code_rate


def test_ffmpeg_decodes_the_waveform_sample_aligned(tmp_path: Path) -> None:
    audio = speech(2.0)
    path = tmp_path / "object.opus"
    path.write_bytes(b"".join(encode_in(audio, 24000, [])))
    decoded = ffmpeg_decoded(path).astype(np.float32)[::2] / 32768  # 48 kHz to 24 kHz
    # Aligned with the input, no delay: the pre-skip removed libopus's look-ahead.
    assert float(np.corrcoef(decoded, audio)[0, 1]) > 0.9
    lagged = float(np.corrcoef(decoded[5:], audio[:-5])[0, 1])
    assert lagged < float(np.corrcoef(decoded, audio)[0, 1])


def test_ffprobe_reports_the_duration_from_the_last_granule(tmp_path: Path) -> None:
    path = tmp_path / "object.opus"
    path.write_bytes(b"".join(encode_in(speech(1.5), 24000, [])))
    out = subprocess.run(
        [
            *("ffprobe", "-v", "error"),
            *("-show_entries", "stream=codec_name,duration_ts"),
            *("-of", "default=noprint_wrappers=1", str(path)),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = dict(line.split("=", 1) for line in out.splitlines())
    # ffmpeg 5.1 counts the pre-skip in the stream's duration; it decodes without it.
    assert info == {"codec_name": "opus", "duration_ts": str(PRE_SKIP + 2 * 36000)}


@pytest.mark.parametrize("rate", [24000, 22050])
@pytest.mark.parametrize("seconds", [0.0, 0.001, 1.0])
def test_opusinfo_validates_the_stream(rate: int, seconds: float, tmp_path: Path) -> None:
    samples = int(seconds * rate)
    path = tmp_path / "object.opus"
    path.write_bytes(b"".join(encode_in(speech(seconds, rate), rate, [])))
    report = opusinfo(path)
    assert "(hard-CBR)" in report or samples == 0
    assert f"Original sample rate: {rate} Hz" in report
    assert "Pre-skip: 312" in report
    if seconds == 1.0:
        assert "Packet duration:   20.0ms (max),   20.0ms (avg),   20.0ms (min)" in report
        assert "Page duration:    200.0ms (max)" in report


@pytest.mark.parametrize("rate", [24000, 22050])
@pytest.mark.parametrize("seconds", [0.001, 1.7])
def test_libopusfile_decodes_exactly_the_samples_at_48khz(
    rate: int, seconds: float, tmp_path: Path
) -> None:
    samples = int(seconds * rate)
    source, out = tmp_path / "object.opus", tmp_path / "decoded.wav"
    source.write_bytes(b"".join(encode_in(speech(seconds, rate), rate, [])))
    subprocess.run(
        ["opusdec", "--quiet", "--rate", "48000", str(source), str(out)],
        check=True,
        capture_output=True,
    )
    code_rate, n = coded(rate, samples)
    assert soundfile.info(str(out)).frames == n * 48000 // code_rate


@pytest.mark.parametrize("rate", [24000, 22050])
def test_soundfile_reads_exactly_the_samples_at_the_coding_rate(rate: int) -> None:
    samples = int(1.3 * rate)
    data = b"".join(encode_in(speech(1.3, rate), rate, [100]))
    code_rate, n = coded(rate, samples)
    audio, read_rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert (read_rate, len(audio)) == (code_rate, n)


# -- the renderer: the length announced before the first byte, with the real engines ----------


@pytest.fixture(scope="module")
def engines() -> list[Engine]:
    return [HibariEngine(threads=1), PiperEngine(voices=("joe",), threads=1)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("voice", "rate"),
    [("heart", None), ("joe", None), ("heart", 16000), ("joe", 44100)],
    ids=["heart-24k", "joe-22.05k", "heart-at-16k", "joe-at-44.1k"],
)
async def test_the_renderer_announces_the_length_it_writes(
    engines: list[Engine], voice: str, rate: int | None, tmp_path: Path
) -> None:
    engine = next(e for e in engines if voice in e.voices)
    renderer = Renderer(engines, workers=1, metrics=Metrics())
    try:
        spec = Spec.create(
            text="The length comes first. Then every byte, as it is rendered, to the end.",
            voice=voice,
            format=OPUS,
            model=engine.model_id(voice),
            rate=rate,
        )
        lengths: list[int | None] = []
        pieces: list[bytes] = []
        announced_first: list[bool] = []

        def sink(data: bytes) -> None:
            announced_first.append(bool(lengths))
            pieces.append(data)

        seconds = await renderer.render(engine, spec, sink, lengths.append)
    finally:
        renderer.close()
    data = b"".join(pieces)
    assert all(announced_first) and lengths == [len(data)]
    path = tmp_path / "object.opus"
    path.write_bytes(data)
    opusinfo(path)
    # Decoded at 48 kHz: the rendered samples, through the resamplers the rate asks for.
    samples = round(seconds * engine.sample_rate)
    out_rate = rate or engine.sample_rate
    if out_rate != engine.sample_rate:
        samples = Resampler(engine.sample_rate, out_rate).output_count(samples)
    code_rate, n = coded(out_rate, samples)
    assert len(ffmpeg_decoded(path)) == n * 48000 // code_rate
