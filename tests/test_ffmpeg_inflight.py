"""ffprobe and ffmpeg (Debian's) read signed URLs straight from the edge, for every format
of voice `heart`: on a cold key, while the object is still being rendered (the player's
first request joins the render in flight), and on a cached key.

The edge runs on a real loopback port (aiohttp's TestServer) so the tools connect to it
as any player would. Renders go through `HeldEngine` (the real hibari engine, paused after
its first sentence) so the tool's first request provably arrives while the object is in
flight; the pause is lifted as soon as that request has joined the render.

Beyond a clean exit, the decode tests compare what ffmpeg decodes from a cold key with
what it decodes from the same key once cached: a player must hear the same audio.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nearvoice.edge.app import create_app
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.node import Node
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.hibari_engine import HibariEngine
from tests.support import (
    eventually,
    make_config,
    make_keyring,
    make_spec,
    node_of,
    sign,
    wait_ready,
)
from tests.test_inflight import HeldEngine

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

Client = TestClient[Any, Any]
KEYRING = make_keyring()
SAMPLE_RATE = 24000
TOOL_TIMEOUT = 60.0
TEXT = "A player opens this line. It seeks half a second in. Then it plays to the end."
CODECS = {
    AudioFormat.WAV: "pcm_s16le",
    AudioFormat.FLAC: "flac",
    AudioFormat.MP3: "mp3",
    AudioFormat.OPUS: "opus",
    AudioFormat.PCM: "pcm_s16le",
    AudioFormat.AAC: "aac",
}
FORMATS = list(AudioFormat)


@dataclass
class Edge:
    app: web.Application
    client: Client
    engine: HeldEngine

    @property
    def node(self) -> Node:
        return node_of(self.app)

    def url(self, spec: Spec) -> str:
        return str(self.client.make_url(sign(KEYRING, spec)))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    engine = HeldEngine(HibariEngine(threads=1), hold_at=None)
    app = create_app(make_config(tmp_path_factory.mktemp("ffmpeg")), KEYRING, engines=[engine])
    async with TestClient(TestServer(app)) as client:
        await wait_ready(client)
        yield Edge(app, client, engine)
        engine.release()


@pytest_asyncio.fixture(loop_scope="module")
async def edge(shared_edge: Edge) -> AsyncIterator[Edge]:
    yield shared_edge
    shared_edge.engine.run_freely()
    node = shared_edge.node
    await eventually(lambda: not any(f.is_running() for f in node._fills.values()))


def raw_input_options(fmt: AudioFormat) -> list[str]:
    """Raw PCM has no header: the tools must be told what it is."""
    if fmt is AudioFormat.PCM:
        return ["-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1"]
    return []


def ffprobe_command(fmt: AudioFormat, url: str) -> list[str]:
    return [
        "ffprobe",
        "-v",
        "error",
        *raw_input_options(fmt),
        "-show_entries",
        "stream=codec_name,sample_rate",
        "-of",
        "json",
        url,
    ]


def ffmpeg_seek_command(fmt: AudioFormat, url: str) -> list[str]:
    return [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        *raw_input_options(fmt),
        "-ss",
        "0.5",
        "-i",
        url,
        "-f",
        "null",
        "-",
    ]


async def run_tool(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(TOOL_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


async def run_on_cold_key(edge: Edge, spec: Spec, command: list[str]) -> Any:
    """Runs `command` (which reads `spec`'s URL) on a cold key whose render pauses after
    its first sentence; releases the render once the tool's first request started it.

    Nothing else asks for `spec`, so the fill exists only because the tool asked, and it
    cannot finish before the release: whatever the tool read before then (often all it
    needed) came from the object in flight."""
    assert not edge.node.store.contains(spec.key)
    edge.engine.hold(at=1)
    task = asyncio.create_task(run_tool(command))
    await eventually(edge.engine.holding.is_set, seconds=TOOL_TIMEOUT)
    fill = edge.node._fills.get(spec.key)
    assert fill is not None and fill.is_running() and fill.size > 0
    edge.engine.release()
    return await task


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
async def test_ffprobe_reads_a_cold_key_in_flight(edge: Edge, fmt: AudioFormat) -> None:
    spec = make_spec(f"{TEXT} Probe.", fmt=fmt)
    done = await run_on_cold_key(edge, spec, ffprobe_command(fmt, edge.url(spec)))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    streams = json.loads(done.stdout)["streams"]
    assert len(streams) == 1, streams
    assert streams[0]["codec_name"] == CODECS[fmt]
    if fmt is not AudioFormat.OPUS:  # Ogg Opus always reports its 48 kHz decode rate
        assert streams[0]["sample_rate"] == str(SAMPLE_RATE)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
async def test_ffmpeg_seeks_into_a_cold_key_in_flight(edge: Edge, fmt: AudioFormat) -> None:
    spec = make_spec(f"{TEXT} Seek cold.", fmt=fmt)
    done = await run_on_cold_key(edge, spec, ffmpeg_seek_command(fmt, edge.url(spec)))
    assert done.returncode == 0, done.stderr.decode(errors="replace")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
async def test_ffmpeg_seeks_into_a_cached_key(edge: Edge, fmt: AudioFormat) -> None:
    spec = make_spec(f"{TEXT} Seek cached.", fmt=fmt)
    edge.engine.run_freely()
    async with edge.client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        await resp.read()
    await eventually(lambda: edge.node.store.contains(spec.key))

    done = await run_tool(ffmpeg_seek_command(fmt, edge.url(spec)))
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def ffmpeg_decode_command(fmt: AudioFormat, url: str, *, seek: float | None) -> list[str]:
    """Decodes `url` to raw s16le mono at the voice's rate on stdout (after `seek` s)."""
    return [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        *raw_input_options(fmt),
        *(["-ss", str(seek)] if seek is not None else []),
        "-i",
        url,
        "-f",
        "s16le",
        "-ac",
        "1",
        "-ar",
        str(SAMPLE_RATE),
        "-",
    ]


def decoded(done: subprocess.CompletedProcess[bytes]) -> bytes:
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stderr == b"", done.stderr.decode(errors="replace")  # no decoding errors
    return done.stdout


# A player must hear the same audio whether it opened the key while it rendered or after:
# ffmpeg opens with `Range: bytes=0-`, answered in flight with 206 `bytes 0-(2^53-1)/*`,
# and after the commit with an exact 206.
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
async def test_ffmpeg_plays_a_cold_key_in_flight_exactly_like_the_cached_object(
    edge: Edge, fmt: AudioFormat
) -> None:
    spec = make_spec(f"{TEXT} Play cold.", fmt=fmt)
    command = ffmpeg_decode_command(fmt, edge.url(spec), seek=None)
    cold = decoded(await run_on_cold_key(edge, spec, command))
    await eventually(lambda: edge.node.store.contains(spec.key))
    cached = decoded(await run_tool(command))
    assert len(cold) / 2 / SAMPLE_RATE == pytest.approx(len(cached) / 2 / SAMPLE_RATE)
    assert cold == cached


# Only formats whose decoder ffmpeg can seek in a stream that is not seekable (a plain
# 200 of the final bytes with no length): for WAV, FLAC and raw PCM, ffmpeg 5.1 loses
# audio after `-ss` on any unseekable stream, from any server, so the edge cannot be held
# to it there (test_ffmpeg_seeks_into_a_cold_key_in_flight still requires a clean exit).
@pytest.mark.parametrize("fmt", [AudioFormat.MP3, AudioFormat.OPUS], ids=str)
async def test_ffmpeg_seek_into_a_cold_key_plays_like_the_cached_object(
    edge: Edge, fmt: AudioFormat
) -> None:
    spec = make_spec(f"{TEXT} Seek and play cold.", fmt=fmt)
    command = ffmpeg_decode_command(fmt, edge.url(spec), seek=0.5)
    cold = decoded(await run_on_cold_key(edge, spec, command))
    await eventually(lambda: edge.node.store.contains(spec.key))
    cached = decoded(await run_tool(command))
    cold_seconds = len(cold) / 2 / SAMPLE_RATE
    cached_seconds = len(cached) / 2 / SAMPLE_RATE
    assert cold_seconds == pytest.approx(cached_seconds, abs=0.05)


# A player must start on the first chunks, not after the render: with the length announced,
# ffmpeg that learns the size of an MP3 reads its last bytes (the ID3v1 probe) and of an
# Ogg stream its last page (the duration), before it decodes anything; so those requests
# are answered as for an unknown length (edge.http.stream's TAIL_PROBED); a WAV's exact
# 206 is read from its start. ffmpeg probes about 32 KiB before it decodes (8 s of Opus),
# so the render is held after a few chunks.
LONG = " ".join(
    f"Announcement {n}: the train to the coast leaves from platform {n}." for n in range(9)
)


@pytest.mark.parametrize("fmt", [AudioFormat.WAV, AudioFormat.MP3, AudioFormat.OPUS], ids=str)
async def test_ffmpeg_decodes_a_sized_cold_key_while_the_render_is_held(
    edge: Edge, fmt: AudioFormat
) -> None:
    spec = make_spec(f"{LONG} Decode while held.", fmt=fmt)
    edge.engine.hold(at=5)
    command = ffmpeg_decode_command(fmt, edge.url(spec), seek=None)
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        await eventually(edge.engine.holding.is_set, seconds=20)
        async with asyncio.timeout(TOOL_TIMEOUT / 3):
            first = await proc.stdout.read(4096)  # the first decoded samples
        fill = edge.node._fills.get(spec.key)
        assert first and fill is not None and fill.is_running() and fill.length is not None
        assert edge.engine.holding.is_set()  # the rest of the object does not exist yet
    finally:
        edge.engine.release()
        async with asyncio.timeout(TOOL_TIMEOUT):
            await proc.communicate()
    assert proc.returncode == 0
