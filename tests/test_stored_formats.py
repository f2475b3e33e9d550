"""Every stored format reads back with the right duration in the tools people use:
python-soundfile (libsndfile) and ffprobe (ffmpeg).

The expected duration is the duration pass's own sample count, which the render is checked
against. WAV, FLAC and PCM say it exactly; MP3 (no Info tag, see edge.synth.streaming) and
Opus are within a frame of it, plus the MP3 encoder's delay.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile
from aiohttp.test_utils import TestClient, TestServer

from nearvoice.edge.app import create_app
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.hibari_engine import HibariEngine
from tests.support import make_config, make_keyring, make_spec, sign, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

KEYRING = make_keyring()
TEXT = "Stored objects say how long they are. Every decoder agrees, to the sample."
RATE = 24000
MP3_SLACK = (1105 + 2 * 576) / RATE  # LAME's encoder delay and the last frames' padding
TOLERANCE = {
    AudioFormat.WAV: 0.0,
    AudioFormat.PCM: 0.0,
    AudioFormat.FLAC: 0.0,
    AudioFormat.MP3: MP3_SLACK,
    AudioFormat.OPUS: 0.021,  # a 20 ms Opus frame
    AudioFormat.AAC: 3 * 1024 / RATE,  # the encoder's priming frame and the last frame
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def node(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestClient[Any, Any]]:
    engine = HibariEngine(threads=1)
    app = create_app(make_config(tmp_path_factory.mktemp("formats")), KEYRING, engines=[engine])
    async with TestClient(TestServer(app)) as client:
        await wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def expected_seconds() -> float:
    engine = HibariEngine(threads=1)
    counted = engine.samples(TEXT, "heart", 1.0)
    assert counted is not None
    return counted / RATE


async def stored(client: TestClient[Any, Any], fmt: AudioFormat, tmp_path: Path) -> Path:
    url = sign(KEYRING, make_spec(TEXT, fmt=fmt))
    async with client.get(url) as resp:  # the render
        assert resp.status == 200
        await resp.read()
    async with client.get(url) as resp:  # the stored object
        assert resp.status == 200
        path = tmp_path / f"object.{fmt.value}"
        path.write_bytes(await resp.read())
    return path


def ffmpeg_decoded_seconds(path: Path) -> float:
    """Seconds of audio ffmpeg decodes (ADTS states no length for ffprobe to read)."""
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", str(RATE),
         "-"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return len(done.stdout) / 2 / RATE


def ffprobe_seconds(path: Path, fmt: AudioFormat) -> float:
    raw = ["-f", "s16le", "-ar", str(RATE), "-ac", "1"] if fmt is AudioFormat.PCM else []
    done = subprocess.run(
        ["ffprobe", "-v", "error", *raw, "-show_entries", "format=duration", "-of", "json",
         str(path)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return float(json.loads(done.stdout)["format"]["duration"])


@pytest.mark.parametrize("fmt", list(AudioFormat))
async def test_soundfile_and_ffprobe_read_the_right_duration(
    node: TestClient[Any, Any], fmt: AudioFormat, expected_seconds: float, tmp_path: Path
) -> None:
    path = await stored(node, fmt, tmp_path)
    tolerance = TOLERANCE[fmt]
    if fmt is AudioFormat.PCM:
        samples = np.frombuffer(path.read_bytes(), dtype="<i2")
        assert len(samples) / RATE == pytest.approx(expected_seconds, abs=1e-9)
    elif fmt is AudioFormat.AAC:
        pass  # libsndfile reads no AAC; ffprobe below
    else:
        data, rate = soundfile.read(io.BytesIO(path.read_bytes()), dtype="float32")
        assert rate in (RATE, 48000)
        assert len(data) / rate == pytest.approx(expected_seconds, abs=tolerance + 1e-9)
        info = soundfile.info(str(path))
        if fmt in (AudioFormat.WAV, AudioFormat.FLAC):
            # The header states the count: readers need not scan the object for it.
            assert info.frames == round(expected_seconds * RATE)
    aac = fmt is AudioFormat.AAC
    measured = ffmpeg_decoded_seconds(path) if aac else ffprobe_seconds(path, fmt)
    assert measured == pytest.approx(expected_seconds, abs=tolerance + 0.001)
