"""Misses rendered by the real hibari engine (from the hibari-tts package), end to end
through the app: miss then hit, draft bypass, determinism across nodes, and every
delivery format read back by ffprobe (Debian's ffmpeg)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import soundfile
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.policy import Policy
from tests.support import (
    eventually,
    make_config,
    make_keyring,
    make_spec,
    metric,
    node_of,
    sign,
    wait_ready,
)

pytestmark = pytest.mark.slow

Client = TestClient[Any, Any]
SAMPLE_RATE = 24000
TEXT = "Generate near, deliver near."

FFPROBE_CODECS = {
    AudioFormat.WAV: "pcm_s16le",
    AudioFormat.FLAC: "flac",
    AudioFormat.MP3: "mp3",
    AudioFormat.OPUS: "opus",
    AudioFormat.PCM: "pcm_s16le",
    AudioFormat.AAC: "aac",
}


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring()


async def start_node(
    aiohttp_client: AiohttpClient, data: Path, keyring: Keyring
) -> tuple[web.Application, Client]:
    """A node with the default (real) engines, once /readyz says it is warm."""
    app = create_app(make_config(data), keyring)
    client = await aiohttp_client(app)
    await wait_ready(client)
    return app, client


@pytest.fixture
async def node(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> tuple[web.Application, Client]:
    return await start_node(aiohttp_client, tmp_path, keyring)


async def fetch(client: Client, url: str, **kwargs: Any) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.get(url, **kwargs) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def synths(client: Client) -> float:
    return await metric(client, "nearvoice_synth_total", engine="hibari")


async def requests(client: Client, result: str) -> float:
    return await metric(client, "nearvoice_requests_total", result=result)


async def test_healthz_answers_before_and_after_warmup(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path), keyring))
    async with client.get("/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    await wait_ready(client)
    async with client.get("/healthz") as resp:
        assert resp.status == 200
    async with client.get("/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"


async def test_first_request_is_a_miss_that_renders_once(node: Any, keyring: Keyring) -> None:
    _, client = node
    status, _, _ = await fetch(client, sign(keyring, make_spec(TEXT)))
    assert status == 200
    assert await requests(client, "miss") == 1
    assert await requests(client, "hit") == 0
    assert await synths(client) == 1


async def test_rendered_body_is_a_valid_wav(node: Any, keyring: Keyring) -> None:
    _, client = node
    status, headers, body = await fetch(client, sign(keyring, make_spec(TEXT)))
    assert status == 200
    assert headers["Content-Type"] == "audio/wav"
    # A miss streams while it renders, and hibari's duration pass gave its exact length
    # before the first byte (docs/contracts.md#exact-length-from-the-first-byte).
    assert headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in headers
    audio, rate = soundfile.read(io.BytesIO(body), dtype="float32")
    assert rate == SAMPLE_RATE
    assert audio.ndim == 1
    assert len(audio) > SAMPLE_RATE // 2  # a spoken sentence, not a click
    assert float(abs(audio).max()) > 0.01


async def test_second_request_is_a_hit_with_identical_bytes(node: Any, keyring: Keyring) -> None:
    app, client = node
    url = sign(keyring, make_spec(TEXT))
    _, first_headers, first = await fetch(client, url)
    # The last byte can reach the client just before the commit: wait for it.
    await eventually(lambda: node_of(app).store.contains(make_spec(TEXT).key))
    _, second_headers, second = await fetch(client, url)
    assert second == first
    assert second_headers["ETag"] == first_headers["ETag"]
    assert await requests(client, "hit") == 1
    assert await synths(client) == 1
    assert node_of(app).store.contains(make_spec(TEXT).key)


async def test_range_on_a_miss_is_a_slice_of_the_rendered_object(
    node: Any, keyring: Keyring
) -> None:
    _, client = node
    url = sign(keyring, make_spec(TEXT))
    status, headers, part = await fetch(client, url, headers={"Range": "bytes=0-1023"})
    assert status == 206
    _, _, whole = await fetch(client, url)
    # In flight, the length is the one the duration pass announced.
    assert headers["Content-Range"] == f"bytes 0-1023/{len(whole)}"
    assert headers["Content-Length"] == "1024"
    assert part == whole[:1024]
    assert await synths(client) == 1


async def test_range_on_the_rendered_object_is_206(node: Any, keyring: Keyring) -> None:
    app, client = node
    url = sign(keyring, make_spec(TEXT))
    _, _, whole = await fetch(client, url)
    await eventually(lambda: node_of(app).store.contains(make_spec(TEXT).key))
    n = len(whole)
    status, headers, part = await fetch(client, url, headers={"Range": f"bytes=44-{n - 1}"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 44-{n - 1}/{n}"
    assert part == whole[44:]  # the PCM samples after the 44-byte WAV header
    assert await requests(client, "hit") == 1


async def test_draft_is_streamed_through_and_never_stored(node: Any, keyring: Keyring) -> None:
    app, client = node
    spec = make_spec(TEXT)
    url = sign(keyring, spec, policy=Policy.DRAFT)
    status, headers, first = await fetch(client, url)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert not node_of(app).store.contains(spec.key)
    assert node_of(app).store.count() == 0
    # The last byte can reach the client just before the render ends: wait for its end.
    await eventually(lambda: not any(f.is_running() for f in node_of(app)._fills.values()))

    status, _, second = await fetch(client, url)
    assert status == 200
    assert second == first
    assert await synths(client) == 2
    assert await requests(client, "bypass") == 2
    assert await requests(client, "miss") == 0
    assert node_of(app).store.count() == 0


async def test_renders_are_byte_identical_across_nodes(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    _, one = await start_node(aiohttp_client, tmp_path / "a", keyring)
    _, two = await start_node(aiohttp_client, tmp_path / "b", keyring)
    for fmt in AudioFormat:
        url = sign(keyring, make_spec(TEXT, fmt=fmt))
        status_one, _, body_one = await fetch(one, url)
        status_two, _, body_two = await fetch(two, url)
        assert (status_one, status_two) == (200, 200), fmt
        assert body_one, fmt
        assert body_one == body_two, f"{fmt} renders differ between nodes"


def ffprobe(path: Path, fmt: AudioFormat) -> dict[str, Any]:
    raw = ["-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1"] if fmt is AudioFormat.PCM else []
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            *raw,
            "-show_entries",
            "stream=codec_name,sample_rate",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    streams = json.loads(out.stdout)["streams"]
    assert len(streams) == 1, streams
    return dict(streams[0])


async def test_every_format_is_read_by_ffprobe(node: Any, keyring: Keyring, tmp_path: Path) -> None:
    _, client = node
    for fmt in AudioFormat:
        status, _, body = await fetch(client, sign(keyring, make_spec(TEXT, fmt=fmt)))
        assert status == 200, fmt
        path = tmp_path / f"speech.{fmt.value}"
        path.write_bytes(body)
        stream = ffprobe(path, fmt)
        assert stream["codec_name"] == FFPROBE_CODECS[fmt], fmt
        if fmt is not AudioFormat.OPUS:  # Ogg Opus always reports its 48 kHz decode rate
            assert stream["sample_rate"] == str(SAMPLE_RATE), fmt
