"""Cloned lines through the three tiers, as real processes on loopback (docs/contracts.md, "Spec
and key" and "Reference voices"): an origin whose `[[external]]` IndexTTS2 engine is
tests/indextts2_server.py (index-tts-vllm's wire format rendered with piper: it cannot clone,
and tells what reached it), a shield and an edge that both know the voice but hold no clip.

1. A line minted at the origin with a reference voice, an emotion and a duration plays
   at the edge: neither the edge (whose hibari engine honours durations but neither
   emotions nor clips) nor the shield (which renders nothing) can render it, so both send
   it upstream as `capability`; the bytes are the origin's, and the server received the
   controls.
2. Once the voice is deleted at the origin, its lines answer 410 `unknown_ref` at every
   tier: relayed, not turned into a 502, not cached, and not counted against the
   upstreams' circuit breakers. The same clip uploaded again gets the same id, and the
   same URLs play again.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.origin.mint import MINT_TOKEN_ENV
from nearvoice.origin.store import FilesystemStore
from tests.indextts2_server import IndexTTS2Server, write_speaker
from tests.support import metric_from
from tests.test_stack import (
    Answer,
    NodeProcess,
    delta,
    free_port,
    http,
    metrics,
    running,
    settled,
    start_node,
    wait_ready,
    wav,
)

pytestmark = pytest.mark.slow

MINT = "mint-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {MINT}"}
EMOTION = {"vector": [0.8, 0, 0, 0, 0, 0, 0.3, 0], "alpha": 0.7}
LINE = "We leave at dawn, she said, and we do not come back."
DURATION = 2.4


def upload(origin: str, clip: bytes) -> Answer:
    """POST /v1/voices with the clip as the raw body."""
    request = urllib.request.Request(
        f"{origin}/v1/voices",
        data=clip,
        method="POST",
        headers={**AUTH, "Content-Type": "audio/wav"},
    )
    return http_request(request)


def http_request(request: urllib.request.Request) -> Answer:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=120) as resp:
            return Answer(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, dict(exc.headers.items()), exc.read())


def external(wire: str, where: Path) -> str:
    """The `[[external]]` table every tier lists: the origin renders with it, the shield
    and the edge only learn the voice from it."""
    return (
        "[[external]]\n"
        'name = "indextts2"\n'
        f'base_url = "{wire}"\n'
        'protocol = "indextts2"\n'
        "sample_rate = 22050\n"
        'controls = ["duration", "emotion", "ref"]\n'
        f'clip_dir = "{where / "clips"}"\n'
        "[[external.voices]]\n"
        'name = "alice"\n'
        f'remote = "{where / "alice.wav"}"\n'
        'model_id = "indextts2-alice@test"\n'
    )


@dataclass
class Cloning:
    edge: NodeProcess
    shield: NodeProcess
    origin: NodeProcess
    wire: IndexTTS2Server
    store: Path
    clip: bytes
    clips: Path
    """The directory the origin shares with the server."""
    played: dict[str, bytes] = field(default_factory=dict)
    """Key -> the bytes the edge played."""

    def mint(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = http(f"{self.origin.base}/v1/speech", method="POST", body=body, headers=AUTH)
        assert answer.status == 201, answer.body
        minted: dict[str, Any] = answer.json()
        return minted


@pytest.fixture(scope="module")
def cloning(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloning]:
    where = tmp_path_factory.mktemp("cloning")
    engine = PiperEngine(voices=("joe",), threads=1)
    write_speaker(engine, where / "alice.wav")  # the server's own speaker, for warm-ups
    clip = (where / "alice.wav").read_bytes()  # ~7 s of speech, registered below
    env = {MINT_TOKEN_ENV: MINT, ADMIN_TOKEN_ENV: ADMIN}
    with IndexTTS2Server(engine) as wire:
        table = external(wire.url, where)
        edge_port = free_port()
        edge_base = f"http://127.0.0.1:{edge_port}"
        store = where / "objects"
        origin_config = (
            f'[origin]\npublic_base = "{edge_base}"\nstore = "{store}"\n'
            f'push_edges = ["{edge_base}"]\n\n'
            "[synth]\nworkers = 1\nvoices = []\n\n" + table
        )
        # Generous: a render on a small, busy CPU can be slow, and these tests are not
        # about timeouts.
        shield_config = "[upstream]\nfirst_byte_timeout = 60.0\ndeadline = 90.0\n\n" + table
        edge_config = (
            "[upstream]\nfirst_byte_timeout = 100.0\ndeadline = 120.0\n\n"
            "[synth]\nworkers = 1\n\n" + table
        )
        nodes: list[NodeProcess] = []
        with running(nodes):
            origin = start_node("origin", where, config=origin_config, env=env)
            nodes.append(origin)
            shield = start_node(
                "shield", where, upstreams=[origin.base], config=shield_config, env=env
            )
            nodes.append(shield)
            edge = start_node(
                "edge",
                where,
                upstreams=[shield.base],
                config=edge_config,
                env=env,
                port=edge_port,
            )
            nodes.append(edge)
            wait_ready(origin, shield, edge)
            yield Cloning(edge, shield, origin, wire, store, clip, where / "clips")


@pytest.fixture(scope="module")
def voice(cloning: Cloning) -> dict[str, Any]:
    answer = upload(cloning.origin.base, cloning.clip)
    assert answer.status == 201, answer.body
    registered: dict[str, Any] = answer.json()
    return registered


def cloned(cloning: Cloning, voice: dict[str, Any], text: str) -> dict[str, Any]:
    return cloning.mint(
        {
            "text": text,
            "voice": "alice",
            "format": "wav",
            "ref": voice["id"],
            "emotion": EMOTION,
            "duration": DURATION,
        }
    )


def path_of(url: str) -> str:
    return "/v1/speech/" + url.split("/v1/speech/", 1)[1]


class TestCloning:
    """Runs in order: the last test deletes the voice and registers it again."""

    def test_a_cloned_line_plays_at_the_edge_sent_upstream_as_capability(
        self, cloning: Cloning, voice: dict[str, Any]
    ) -> None:
        minted = cloned(cloning, voice, LINE)
        assert minted["url"].startswith(cloning.edge.base)
        before = {n.role: metrics(n.base) for n in (cloning.edge, cloning.shield)}
        answer = http(minted["url"])
        assert answer.status == 200, answer.body[:300]
        settled(minted["url"])
        after = {n.role: metrics(n.base) for n in (cloning.edge, cloning.shield)}
        for role in ("edge", "shield"):
            moved = delta(before[role], after[role], "nearvoice_upstream_requests_total",
                          reason="capability")  # fmt: skip
            assert moved == 1, role
            no_engine = delta(before[role], after[role], "nearvoice_upstream_requests_total",
                              reason="no_engine")  # fmt: skip
            assert no_engine == 0, role
        # The origin's bytes, as it keeps them and as it serves them.
        found = FilesystemStore(cloning.store).get(minted["key"])
        assert found is not None and found[1] == answer.body
        assert http(cloning.origin.base + path_of(minted["url"])).body == answer.body
        rate, frames = wav(answer.body)
        assert rate == 22050 and frames > 0
        cloning.played[minted["key"]] = answer.body
        # What the server was sent: the registered clip's path, and the controls.
        sent = cloning.wire.log[-1]
        assert sent["text"] == LINE
        assert Path(sent["audio_paths"][0]).stem == voice["sha256"]
        assert (sent["emo_vector"], sent["emo_alpha"]) == (EMOTION["vector"], EMOTION["alpha"])
        assert sent["duration_factor"] == round(DURATION / (len(LINE) * 0.065), 3)
        # ...and what the server says it received (its own headers), reading the same clip.
        request = urllib.request.Request(
            f"{cloning.wire.url}/tts_url",
            data=json.dumps(sent).encode(),
            headers={"Content-Type": "application/json"},
        )
        echoed = http_request(request)
        assert echoed.status == 200
        received = json.loads(echoed.headers["X-Received-Controls"])
        assert received["emo_vector"] == EMOTION["vector"]
        assert received["duration_factor"] == sent["duration_factor"]
        assert echoed.headers["X-Clip-Sha256"] == voice["sha256"]

    def test_a_deleted_voice_answers_410_at_every_tier_and_returns_with_its_clip(
        self, cloning: Cloning, voice: dict[str, Any]
    ) -> None:
        played = cloned(cloning, voice, LINE)  # cached at the edge by the test above
        unplayed = cloned(cloning, voice, "A line nobody asked for before the deletion.")
        assert http(played["url"]).status == 200
        deleted = http(f"{cloning.origin.base}/v1/voices/{voice['id']}", method="DELETE",
                       headers=AUTH)  # fmt: skip
        assert deleted.status == 200, deleted.body
        assert played["key"] in deleted.json()["purged"]
        assert deleted.json()["edges"] == {cloning.edge.base: 200}
        assert not (cloning.clips / f"{voice['sha256']}.wav").exists()  # no copy left
        before = metrics(cloning.edge.base)
        # More refusals than the breakers' failure threshold (3): none of them opens.
        for url in (played["url"], unplayed["url"]) * 2:
            answer = http(url)
            assert answer.status == 410, answer.body[:300]
            assert answer.headers["Content-Type"].startswith("application/json")
            assert answer.json()["error"] == "unknown_ref"
        for node in (cloning.shield, cloning.origin):
            answer = http(node.base + path_of(unplayed["url"]))
            assert (answer.status, answer.json()["error"]) == (410, "unknown_ref"), node.role
        after = metrics(cloning.edge.base)
        # 4xx answers: rejected, not errors (which count 5xx, and page).
        assert delta(before, after, "nearvoice_requests_total", result="rejected") == 4
        assert delta(before, after, "nearvoice_requests_total", result="error") == 0
        assert delta(before, after, "nearvoice_requests_total", result="stale") == 0
        for text in (after, metrics(cloning.shield.base)):
            assert not [
                line
                for line in text.splitlines()
                if line.startswith("nearvoice_upstream_circuit_open{") and not line.endswith(" 0.0")
            ]
        assert metric_from(after, "nearvoice_cache_objects") == 0

        # The same clip again: the same id and hash, and the same URLs play again.
        again = upload(cloning.origin.base, cloning.clip)
        assert again.status == 201 and again.json() == voice
        replayed = http(played["url"])
        assert replayed.status == 200, replayed.body[:300]
        assert replayed.body == cloning.played[played["key"]]  # the renders are deterministic
        assert http(unplayed["url"]).status == 200
