"""Reference voices at the origin (docs/contracts.md#reference-voices) and the IndexTTS2 adapter
(origin/external.py, protocol `indextts2`), against real servers on loopback: the origin
app, its object store (a directory, and SeaweedFS for S3), and tests/indextts2_server.py,
a server that speaks index-tts-vllm's wire format but cannot clone (it renders with
piper; the tests assert what reached it, never that a voice was cloned).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.config import (
    ExternalSettings,
    ExternalVoiceSettings,
    OriginSettings,
    SynthSettings,
)
from nearvoice.edge.producer import PersistentStore
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.origin.app import create_origin_app
from nearvoice.origin.mint import MINT_TOKEN_ENV
from nearvoice.origin.refvoices import CANONICAL_RATE, RefVoices
from nearvoice.origin.store import FilesystemStore
from tests.indextts2_server import IndexTTS2Server
from tests.openai_tts_server import OpenAITTSServer
from tests.seaweed import SeaweedS3, seaweed_fixture
from tests.support import make_config, make_keyring, metric, node_of, wait_ready

Client = TestClient[Any, Any]
KEYRING = make_keyring()
TOKEN = "mint-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEECH = (
    "This is a reference clip for cloning. It lasts a few seconds, long enough to hold a "
    "voice, and short enough to upload."
)
seaweed = seaweed_fixture(scope="module")


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray[Any, Any], int]:
    """Real speech (piper joe) of about 7 s."""
    engine = PiperEngine()
    audio = np.concatenate(list(engine.stream(SPEECH, "joe", 1.0, 0)))
    return audio, engine.sample_rate


def encode(audio: np.ndarray[Any, Any], rate: int, fmt: str = "WAV", channels: int = 1) -> bytes:
    """The clip's 16-bit samples in `fmt`: the same samples whatever the container."""
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    frames = np.repeat(pcm[:, None], channels, axis=1) if channels > 1 else pcm
    out = io.BytesIO()
    soundfile.write(out, frames, rate, format=fmt, subtype="PCM_16")
    return out.getvalue()


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PersistentStore]:
    if request.param == "filesystem":
        yield FilesystemStore(tmp_path / "objects")
        return
    from nearvoice.origin.store import S3Store
    from tests.seaweed import ADMIN

    server: SeaweedS3 = request.getfixturevalue("seaweed")
    s3 = S3Store(
        "nearvoice-refs",
        f"t/{uuid.uuid4().hex[:12]}",
        endpoint_url=server.endpoint,
        access_key=ADMIN.access_key,
        secret_key=ADMIN.secret_key,
    )
    yield s3
    s3.close()


@pytest.fixture
async def origin(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    store: PersistentStore,
    monkeypatch: pytest.MonkeyPatch,
) -> Client:
    monkeypatch.setenv(MINT_TOKEN_ENV, TOKEN)
    config = make_config(tmp_path, origin=OriginSettings(), synth=SynthSettings(workers=1))
    return await aiohttp_client(create_origin_app(config, KEYRING, engines=[], persistent=store))


async def upload(client: Client, body: bytes, kind: str = "audio/wav") -> tuple[int, Any]:
    headers = {**AUTH, "Content-Type": kind}
    async with client.post("/v1/voices", data=io.BytesIO(body), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_clip_is_stored_once_in_canonical_form(
    origin: Client, speech: tuple[np.ndarray[Any, Any], int], store: PersistentStore
) -> None:
    audio, rate = speech
    status, voice = await upload(origin, encode(audio, rate))
    assert status == 201, voice
    assert voice["id"] == f"ref_{voice['sha256']}"
    assert abs(voice["seconds"] - len(audio) / rate) < 0.02
    stored = store.get(voice["sha256"])
    assert stored is not None
    canonical, canonical_rate = soundfile.read(io.BytesIO(stored[1]), dtype="int16")
    assert canonical_rate == CANONICAL_RATE and canonical.ndim == 1
    assert hashlib.sha256(stored[1]).hexdigest() == voice["sha256"]
    # The same clip again, as stereo FLAC in a multipart part named `file`: the same id.
    form = aiohttp.FormData()
    form.add_field("file", encode(audio, rate, "FLAC", 2), filename="me.flac")
    async with origin.post("/v1/voices", data=form, headers=AUTH) as resp:
        assert resp.status == 201
        assert await resp.json() == voice
    async with origin.get(f"/v1/voices/{voice['id']}", headers=AUTH) as resp:
        assert resp.status == 200 and await resp.json() == voice
    async with origin.delete(f"/v1/voices/{voice['id']}", headers=AUTH) as resp:
        assert resp.status == 200
    assert store.get(voice["sha256"]) is None
    async with origin.get(f"/v1/voices/{voice['id']}", headers=AUTH) as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "unknown_ref"


async def test_bad_clips_each_get_their_own_error(
    origin: Client, speech: tuple[np.ndarray[Any, Any], int]
) -> None:
    audio, rate = speech
    cases = [
        (b"not audio at all" * 100, "audio/wav", 400, "not_audio"),
        (encode(audio[: 2 * rate], rate), "audio/wav", 400, "clip_too_short"),
        (encode(np.tile(audio, 5), rate), "audio/wav", 400, "clip_too_long"),
        (encode(audio * 1e-4, rate), "audio/wav", 400, "clip_silent"),
        (b"\0" * (10 * 1024 * 1024 + 1), "audio/wav", 413, "clip_too_large"),
        (encode(audio, rate), "text/plain", 415, "unsupported_media_type"),
    ]
    for body, kind, status, code in cases:
        got = await upload(origin, body, kind)
        assert got[0] == status and got[1]["error"] == code, (code, got)
    async with origin.post("/v1/voices", data=b"", headers={"Content-Type": "audio/wav"}) as resp:
        assert resp.status == 401


# -- the IndexTTS2 adapter ----------------------------------------------------------------------


@dataclass
class Stack:
    client: Client
    server: IndexTTS2Server
    clip_dir: Path
    store: FilesystemStore


@pytest.fixture(scope="module")
def indextts2() -> Iterator[IndexTTS2Server]:
    """Started outside any event loop: the server runs its own, in a thread."""
    with IndexTTS2Server() as server:
        yield server


@pytest.fixture
async def cloning(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    indextts2: IndexTTS2Server,
    speech: tuple[np.ndarray[Any, Any], int],
) -> AsyncIterator[Stack]:
    monkeypatch.setenv(MINT_TOKEN_ENV, TOKEN)
    default_clip = tmp_path / "preset.wav"
    default_clip.write_bytes(encode(*speech))
    server = indextts2
    external = ExternalSettings(
        name="indextts",
        base_url=server.url,
        protocol="indextts2",
        sample_rate=22050,
        voices=(ExternalVoiceSettings("alice", str(default_clip), "indextts2-alice@test"),),
        controls=("duration", "emotion", "ref"),
        clip_dir=str(tmp_path / "shared"),
    )
    config = make_config(
        tmp_path,
        origin=OriginSettings(),
        synth=SynthSettings(workers=1, voices=()),
        external=(external,),
    )
    store = FilesystemStore(tmp_path / "objects")
    app = create_origin_app(config, KEYRING, persistent=store)
    client = await aiohttp_client(app)
    await wait_ready(client)
    yield Stack(client, server, tmp_path / "shared", store)


async def test_the_adapter_sends_the_clip_path_and_the_controls(
    cloning: Stack, speech: tuple[np.ndarray[Any, Any], int]
) -> None:
    client = cloning.client
    status, voice = await upload(client, encode(*speech))
    assert status == 201
    body = {
        "text": "Cloned, excited and on time.",
        "voice": "alice",
        "ref": voice["id"],
        "emotion": {"vector": [0.8, 0, 0, 0, 0, 0, 0.3, 0], "alpha": 0.7},
        "duration": 2.2,
    }
    async with client.post("/v1/speech", json=body, headers=AUTH) as resp:
        assert resp.status == 201, await resp.text()
        minted = await resp.json()
    path = minted["url"].split("/v1/speech/", 1)[1]
    async with client.get(f"/v1/speech/{path}") as resp:
        assert resp.status == 200, await resp.text()
        wav = await resp.read()
    audio, rate = soundfile.read(io.BytesIO(wav))
    assert rate == 22050 and len(audio) > 0
    sent = cloning.server.log[-1]
    clip_path = Path(sent["audio_paths"][0])
    assert clip_path.parent == cloning.clip_dir and clip_path.stem == voice["sha256"]
    assert (sent["emo_vector"], sent["emo_alpha"]) == ([0.8, 0, 0, 0, 0, 0, 0.3, 0], 0.7)
    assert sent["duration_factor"] > 0
    assert await metric(client, "nearvoice_duration_error_ratio_count", engine="indextts") == 1
    # The server's own answer says what it received (its header), and that the clip it
    # read hashes to the registered one.
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{cloning.server.url}/tts_url", json=sent) as resp,
    ):
        assert resp.status == 200
        received = json.loads(resp.headers["X-Received-Controls"])
        assert received["emo_vector"] == [0.8, 0, 0, 0, 0, 0, 0.3, 0]
        assert resp.headers["X-Clip-Sha256"] == voice["sha256"]
    # An emotion text goes as IndexTTS2's emo_text with use_emo_text.
    body = {"text": "Said softly.", "voice": "alice", "emotion": {"text": "whispering"}}
    async with client.post("/v1/speech", json=body, headers=AUTH) as resp:
        minted = await resp.json()
    async with client.get("/v1/speech/" + minted["url"].split("/v1/speech/", 1)[1]) as resp:
        assert resp.status == 200
    assert cloning.server.log[-1]["emo_text"] == "whispering"
    assert cloning.server.log[-1]["use_emo_text"] is True

    # Deleting the voice purges what was rendered from it, and refuses its specs.
    key = path.split(".", 1)[0]
    assert cloning.store.get(key) is not None
    async with client.delete(f"/v1/voices/{voice['id']}", headers=AUTH) as resp:
        assert resp.status == 200
        assert (await resp.json())["purged"] == [key]
    assert cloning.store.get(key) is None
    assert not await asyncio.to_thread(clip_path.exists)  # no copy left in the shared dir
    assert await node_of(client.server.app).lookup(key, hit=False) is None
    async with client.get(f"/v1/speech/{path}") as resp:
        assert resp.status == 410 and (await resp.json())["error"] == "unknown_ref"
    async with client.post(
        "/v1/speech", json={"text": "x", "voice": "alice", "ref": voice["id"]}, headers=AUTH
    ) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "unknown_ref"


def test_a_registry_records_renders_once(tmp_path: Path) -> None:
    registry = RefVoices(FilesystemStore(tmp_path))
    sha = "a" * 64
    registry.record(sha, "b" * 64)
    registry.record(sha, "b" * 64)
    registry.record(sha, "c" * 64)
    assert registry._rendered(sha) == ["b" * 64, "c" * 64]


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAITTSServer]:
    with OpenAITTSServer() as server:
        yield server


async def test_the_openai_wire_sends_an_emotion_text_as_instructions(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    openai_server: OpenAITTSServer,
) -> None:
    monkeypatch.setenv(MINT_TOKEN_ENV, TOKEN)
    monkeypatch.setenv("NEARVOICE_API_KEYS", "acme:" + "k" * 40)
    external = ExternalSettings(
        name="gpu-openai",
        base_url=openai_server.url,
        protocol="openai",
        sample_rate=22050,
        voices=(ExternalVoiceSettings("nova", "joe", "gpt-nova@test"),),
        controls=("emotion",),
    )
    config = make_config(
        tmp_path, origin=OriginSettings(), synth=SynthSettings(workers=1, voices=())
    )
    config = config.replace(external=(external,))
    client = await aiohttp_client(create_origin_app(config, KEYRING, persistent=None))
    await wait_ready(client)
    body = {"text": "Tell it gently.", "voice": "nova", "emotion": {"text": "warm and slow"}}
    async with client.post("/v1/speech", json=body, headers=AUTH) as resp:
        assert resp.status == 201, await resp.text()
        url = (await resp.json())["url"]
    async with client.get("/v1/speech/" + url.split("/v1/speech/", 1)[1]) as resp:
        assert resp.status == 200
    assert openai_server.log[-1].body["instructions"] == "warm and slow"
    # Through the OpenAI-compatible door: `instructions` becomes the spec's emotion text
    # for a voice whose engine honours emotion, and reaches the server.
    speech = {"model": "tts-1", "input": "Door test.", "voice": "nova", "instructions": "sunny"}
    api_auth = {"Authorization": "Bearer " + "k" * 40}
    async with client.post("/v1/audio/speech", json=speech, headers=api_auth) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    assert openai_server.log[-1].body["instructions"] == "sunny"
    # The OpenAI wire has no field for an emotion vector: refused before any byte.
    body = {"text": "Vector.", "voice": "nova", "emotion": {"vector": [0.5] + [0] * 7}}
    async with client.post("/v1/speech", json=body, headers=AUTH) as resp:
        url = (await resp.json())["url"]
    async with client.get("/v1/speech/" + url.split("/v1/speech/", 1)[1]) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "unsupported_control"
    # A control it does not declare is refused when minted.
    body = {"text": "Tell it.", "voice": "nova", "duration": 1.0}
    async with client.post("/v1/speech", json=body, headers=AUTH) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "unsupported_control"


@pytest.fixture(scope="module")
def aac(speech: tuple[np.ndarray[Any, Any], int]) -> bytes:
    import shutil
    import subprocess

    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is installed by scripts/system-deps.sh"
    return subprocess.run(
        [ffmpeg, "-v", "error", "-f", "wav", "-i", "pipe:0", "-c:a", "aac", "-f", "adts", "-"],
        input=encode(*speech),
        capture_output=True,
        check=True,
    ).stdout


async def test_a_clip_only_ffmpeg_decodes_is_taken(
    origin: Client, speech: tuple[np.ndarray[Any, Any], int], aac: bytes
) -> None:
    """libsndfile reads no AAC: the origin decodes it with ffmpeg instead."""
    status, voice = await upload(origin, aac, "audio/aac")
    assert status == 201, voice
    assert abs(voice["seconds"] - len(speech[0]) / speech[1]) < 0.1


async def test_deleting_a_voice_purges_its_renders_at_the_edges(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    indextts2: IndexTTS2Server,
    speech: tuple[np.ndarray[Any, Any], int],
) -> None:
    """Edge -> origin, both real servers on loopback: the edge fetches a cloned line from
    the origin (it has no engine for the voice, and never sees the clip) and caches it;
    deleting the voice at the origin purges it at the edge too."""
    from aiohttp.test_utils import TestServer

    from nearvoice.edge.app import create_app
    from tests.seaweed import free_ports
    from tests.test_upstream import QUICK

    monkeypatch.setenv(MINT_TOKEN_ENV, TOKEN)
    monkeypatch.setenv("NEARVOICE_ADMIN_TOKEN", "admin-token-0123456789")
    (edge_port,) = free_ports(1)
    preset = tmp_path / "preset.wav"
    preset.write_bytes(encode(*speech))
    external = ExternalSettings(
        name="indextts",
        base_url=indextts2.url,
        protocol="indextts2",
        sample_rate=22050,
        voices=(ExternalVoiceSettings("alice", str(preset), "indextts2-alice@test"),),
        controls=("ref",),
        clip_dir=str(tmp_path / "shared"),
    )
    origin_config = make_config(
        tmp_path / "origin",
        origin=OriginSettings(push_edges=(f"http://127.0.0.1:{edge_port}",)),
        synth=SynthSettings(workers=1, voices=()),
        external=(external,),
    )
    origin_app = create_origin_app(
        origin_config, KEYRING, persistent=FilesystemStore(tmp_path / "objects")
    )
    origin = await aiohttp_client(origin_app)
    await wait_ready(origin)
    edge_config = make_config(
        tmp_path / "edge",
        synth=SynthSettings(workers=1, voices=()),
        external=(external,),
        upstreams=(str(origin.make_url("")).rstrip("/"),),
        upstream=QUICK,
    )
    edge = await aiohttp_client(TestServer(create_app(edge_config, KEYRING), port=edge_port))
    await wait_ready(edge)

    status, voice = await upload(origin, encode(*speech))
    assert status == 201
    body = {"text": "Through the edge.", "voice": "alice", "ref": voice["id"]}
    async with origin.post("/v1/speech", json=body, headers=AUTH) as resp:
        path = (await resp.json())["url"].split("/v1/speech/", 1)[1]
    key = path.split(".", 1)[0]
    async with edge.get(f"/v1/speech/{path}") as resp:
        assert resp.status == 200
        first = await resp.read()
    edge_node = node_of(edge.server.app)
    await edge_node.flush_recency()
    held = await edge_node.lookup(key, hit=False)
    assert held is not None
    held.close()
    # The clip stays at the origin: nothing the edge keeps is it.
    kept = [p for p in (tmp_path / "edge").rglob("*") if p.is_file()]
    assert kept and all(hashlib.sha256(p.read_bytes()).hexdigest() != voice["sha256"] for p in kept)
    async with origin.delete(f"/v1/voices/{voice['id']}", headers=AUTH) as resp:
        answer = await resp.json()
    assert answer["purged"] == [key]
    assert answer["edges"] == {f"http://127.0.0.1:{edge_port}": 200}
    assert await edge_node.lookup(key, hit=False) is None
    async with edge.get(f"/v1/speech/{path}") as resp:
        # The origin refuses it now, and the edge, which has nothing left, relays that.
        assert resp.status == 410 and (await resp.json())["error"] == "unknown_ref"
    assert len(first) > 44


def test_a_wire_takes_only_the_controls_it_can_carry() -> None:
    from nearvoice.origin.external import ExternalEngine, ExternalVoice

    voices = [ExternalVoice("nova", "joe", "gpt-nova@test")]
    for protocol, control in (("openai", "duration"), ("openai", "ref"), ("piper", "emotion")):
        with pytest.raises(ValueError, match=control):
            ExternalEngine(
                base_url="http://127.0.0.1:9",
                protocol=protocol,  # type: ignore[arg-type]
                voices=voices,
                sample_rate=22050,
                controls=frozenset((control,)),
            )
    with pytest.raises(ValueError, match="clip_dir"):
        ExternalEngine(
            base_url="http://127.0.0.1:9",
            protocol="indextts2",
            voices=voices,
            sample_rate=22050,
            controls=frozenset(("ref",)),
        )
