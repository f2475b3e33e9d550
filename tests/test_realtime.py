"""Realtime sessions end to end (docs/contracts.md#realtime-speech): a real node on loopback, real
WebSocket clients (aiohttp's, and the `websockets` package), the real hibari engine."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import websockets

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.handlers.realtime import HUB
from nearvoice.edge.policy import Policy
from nearvoice.edge.realtime import tokens
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.hibari_engine import HibariEngine, hibari_model_id
from nearvoice.edge.token import sign_url
from tests.api_support import ACME, DRAFTY, KEYRING, LIMITED, ApiNode, api_node
from tests.realtime_support import (
    RecordingEngine,
    connect,
    realtime_config,
    realtime_node,
    receive_all,
    send,
    speak,
)
from tests.support import eventually, metric_from, scrape_until
from tests.test_upstream import closed_port_base

pytestmark = pytest.mark.slow

TEXT = "Hello there, this is the first clause. A second sentence follows! And a third one"
SYNTH = "nearvoice_synth_total"


def segment_spec(text: str, fmt: AudioFormat = AudioFormat.PCM) -> Spec:
    return Spec.create(text=text, voice="heart", format=fmt, model=hibari_model_id("heart"))


async def synth_count(api: ApiNode) -> float:
    return metric_from(await api.metrics(), SYNTH, engine="hibari")


# -- a session ------------------------------------------------------------------------------


async def test_a_session_speaks_each_segment_as_an_ordinary_object(tmp_path: Path) -> None:
    async with realtime_node(tmp_path) as api:
        got = await speak(api, TEXT)
        (updated,) = got.of("session.updated")
        assert updated["sample_rate"] == 24000 and updated["format"] == "pcm"
        started = got.of("segment.started")
        assert [s["text"] for s in started] == [
            "Hello there, this is the first clause.",
            "A second sentence follows!",
            "And a third one",
        ]
        assert [s["segment"] for s in started] == [0, 1, 2]
        assert {s["cache"] for s in started} == {"miss"}
        assert got.events[-1] == {"type": "done"}
        assert got.close_code == 1000
        # Events in order: each segment's started, then its done, before the next.
        kinds = [(e["type"], e.get("segment")) for e in got.events[1:-1]]
        assert kinds == [
            (kind, i) for i in range(3) for kind in ("segment.started", "segment.done")
        ]
        for done in got.of("segment.done"):
            audio = got.audio[done["segment"]]
            assert done["audio_ms"] == len(audio) // 2 * 1000 // 24000 > 300
        # Each segment's audio is exactly the object its signed URL serves (a cache hit).
        for s in started:
            url = sign_url(KEYRING, "", segment_spec(s["text"]), policy=Policy.HOT, ttl=60)
            async with api.client.get(url) as resp:
                assert resp.status == 200
                assert await resp.read() == bytes(got.audio[s["segment"]])
        # Said again, every segment is a cache hit and nothing renders.
        renders = await synth_count(api)
        again = await speak(api, TEXT, piece=7)
        assert [s["cache"] for s in again.of("segment.started")] == ["hit"] * 3
        assert again.all_audio == got.all_audio
        assert await synth_count(api) == renders
        metrics = await scrape_until(
            api.client,
            lambda m: metric_from(m, "nearvoice_realtime_closes_total", reason="done") == 2,
        )
        assert metric_from(metrics, "nearvoice_realtime_segments_total", result="miss") == 3
        assert metric_from(metrics, "nearvoice_realtime_segments_total", result="hit") == 3
        assert metric_from(metrics, "nearvoice_realtime_first_audio_seconds_count") == 6
        assert metric_from(metrics, "nearvoice_realtime_sessions") == 0
        assert metric_from(metrics, "nearvoice_realtime_closes_total", reason="idle") == 0


async def test_joined_segments_play_seamlessly(tmp_path: Path) -> None:
    """Segments start and end quietly (no click where they join), and the join leaves
    the pause a sentence break needs."""
    async with realtime_node(tmp_path) as api:
        got = await speak(api, "The first sentence is here. The second sentence is there.")
        rate = 24000
        edge = rate // 100  # 10 ms
        for index, audio in got.audio.items():
            samples = np.frombuffer(bytes(audio), "<i2").astype(np.float64) / 32768
            peak = np.abs(samples).max()
            assert np.abs(samples[:edge]).max() < 0.05 * max(peak, 1e-3), index
            assert np.abs(samples[-edge:]).max() < 0.05 * max(peak, 1e-3), index
        joined = np.frombuffer(got.all_audio, "<i2").astype(np.float64) / 32768
        boundary = len(got.audio[0]) // 2
        window = joined[boundary - rate // 2 : boundary + rate // 2]
        quiet = np.abs(window) < 0.01
        longest = run = 0
        for q in quiet:
            run = run + 1 if q else 0
            longest = max(longest, run)
        assert longest >= rate * 0.1  # at least 100 ms of pause across the join


async def test_opus_is_a_chained_ogg_stream_ffmpeg_and_libopusfile_decode(
    tmp_path: Path,
) -> None:
    async with realtime_node(tmp_path) as api:
        got = await speak(api, TEXT, format="opus")
        assert got.close_code == 1000
        stream = got.all_audio
        serials, pos = [], 0
        while pos < len(stream):
            assert stream[pos : pos + 4] == b"OggS"
            if stream[pos + 5] & 2:  # beginning of a stream: a new link
                serials.append(struct.unpack_from("<I", stream, pos + 14)[0])
            nsegs = stream[pos + 26]
            pos += 27 + nsegs + sum(stream[pos + 27 : pos + 27 + nsegs])
        assert len(serials) == 3 and len(set(serials)) == 3
        path = tmp_path / "session.opus"
        path.write_bytes(stream)
        expected = sum(d["audio_ms"] for d in got.of("segment.done")) / 1000
        ffmpeg = await asyncio.to_thread(
            subprocess.run,
            ["ffmpeg", "-v", "error", "-i", str(path), *("-f", "s16le", "-ar", "48000", "-")],
            capture_output=True,
            check=True,
        )
        assert ffmpeg.stderr == b""
        assert abs(len(ffmpeg.stdout) / 2 / 48000 - expected) < 0.05
        opusdec = await asyncio.to_thread(
            subprocess.run,
            ["opusdec", "--quiet", "--rate", "48000", str(path), str(tmp_path / "out.wav")],
            capture_output=True,
            check=True,
        )
        assert opusdec.returncode == 0
        decoded = (tmp_path / "out.wav").stat().st_size - 44
        assert abs(decoded / 2 / 48000 - expected) < 0.05


# -- sharing, turns, cancel -------------------------------------------------------------------


async def test_concurrent_sessions_share_one_render_and_a_leaver_stops_nothing(
    tmp_path: Path,
) -> None:
    # The shared segment renders in two chunks (its clause boundary): the engine holds
    # after the first, so both sessions are provably attached to one render in flight.
    engine = RecordingEngine(HibariEngine(("heart",), threads=1), hold_at=1)
    async with realtime_node(tmp_path, engine) as api:
        shared = "Shared words come first, and they go on for a while."
        leaver = await connect(api)
        stayer = await connect(api)
        for ws in (leaver, stayer):
            await send(ws, "session.update", voice="heart", format="pcm")
            await send(ws, "text.delta", text=f"Hi. {shared} ")
        await eventually(engine.holding.is_set)
        got_leaver = await receive_all(leaver, until="segment.started")
        await receive_all(leaver, got_leaver, until="segment.started")
        assert got_leaver.of("segment.started")[-1]["segment"] == 1
        await leaver.close()  # mid-segment, while the render is shared
        await send(stayer, "text.delta", text="Then it ends.")
        await send(stayer, "text.done")
        engine.release()
        got = await receive_all(stayer)
        assert got.close_code == 1000
        caches = [s["cache"] for s in got.of("segment.started")]
        assert caches[1] in ("miss", "collapsed")
        assert engine.texts.count(shared) == 1
        alone = await speak(api, f"Hi. {shared} Then it ends.")
        assert alone.audio[1] == got.audio[1]  # the object the shared render committed
        assert [s["cache"] for s in alone.of("segment.started")] == ["hit"] * 3


async def test_sessions_take_turns_at_rendering(tmp_path: Path) -> None:
    engine = RecordingEngine(HibariEngine(("heart",), threads=1), hold_at=0)
    async with realtime_node(tmp_path, engine, render_slots=1) as api:
        first = await connect(api)
        second = await connect(api)
        await send(first, "session.update", voice="heart", format="pcm")
        await send(first, "text.delta", text="Alpha one. ")
        await eventually(engine.holding.is_set)  # A's first render holds the one slot
        await send(first, "text.delta", text="Alpha two. Alpha three. ")
        await send(second, "session.update", voice="heart", format="pcm")
        await send(second, "text.delta", text="Bravo one. Bravo two. ")
        turns = api.app[HUB].turns
        await eventually(lambda: turns.waiting == 4)
        engine.release()
        for ws in (first, second):
            await send(ws, "text.done")
        a, b = await asyncio.gather(receive_all(first), receive_all(second))
        assert (a.close_code, b.close_code) == (1000, 1000)
        assert engine.texts == [
            "Alpha one.",
            "Bravo one.",
            "Alpha two.",
            "Bravo two.",
            "Alpha three.",
        ]


async def test_cancel_drops_segments_not_started(tmp_path: Path) -> None:
    engine = RecordingEngine(HibariEngine(("heart",), threads=1), hold_at=0)
    async with realtime_node(tmp_path, engine, render_slots=1) as api:
        ws = await connect(api)
        await send(ws, "session.update", voice="heart", format="pcm")
        await send(ws, "text.delta", text="One is first. Two is second. Three is third. ")
        await eventually(engine.holding.is_set)
        await send(ws, "cancel")
        await send(ws, "text.delta", text="Four is fourth.")
        await send(ws, "text.done")
        engine.release()
        got = await receive_all(ws)
        assert [(s["segment"], s["text"]) for s in got.of("segment.started")] == [
            (0, "One is first."),
            (3, "Four is fourth."),
        ]
        assert got.events[-1] == {"type": "done"} and got.close_code == 1000
        assert engine.texts == ["One is first.", "Four is fourth."]


# -- failures ---------------------------------------------------------------------------------


async def test_a_failed_upstream_segment_gets_an_error_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    async with realtime_node(tmp_path, upstreams=(closed_port_base(),)) as api:
        ws = await connect(api)
        await send(ws, "session.update", voice="joe", format="pcm")
        await send(ws, "text.delta", text="Joe is not rendered here. ")
        await send(ws, "session.update", voice="heart")
        await send(ws, "text.delta", text="Heart is rendered here.")
        await send(ws, "text.done")
        got = await receive_all(ws)
        (error,) = got.of("error")
        assert error["segment"] == 0 and error["error"].startswith("upstream")
        assert [s["segment"] for s in got.of("segment.started")] == [1]
        assert got.events[-1] == {"type": "done"}


# -- authentication -------------------------------------------------------------------------


async def test_tokens_authenticate_browsers_and_bind_the_voice(tmp_path: Path) -> None:
    async with realtime_node(tmp_path) as api:
        async with api.client.post(
            "/v1/realtime/tokens",
            json={"voice": "alloy", "ttl": 60},
            headers={"Authorization": f"Bearer {ACME}"},
        ) as resp:
            assert resp.status == 200
            minted = await resp.json()
        assert minted["voice"] == "heart"
        assert minted["url"].startswith("ws://") and "token=" in minted["url"]
        # The independent client: the `websockets` package.
        async with websockets.connect(minted["url"]) as ws:
            await ws.send(json.dumps({"type": "session.update", "format": "pcm"}))
            updated = json.loads(await ws.recv())
            assert updated["voice"] == "heart"
            await ws.send(json.dumps({"type": "session.update", "voice": "joe"}))
            assert json.loads(await ws.recv())["error"] == "voice_not_allowed"
            await ws.send(json.dumps({"type": "text.delta", "text": "Token speech."}))
            await ws.send(json.dumps({"type": "text.done"}))
            audio = b""
            while True:
                try:
                    frame = await ws.recv()
                except websockets.ConnectionClosedOK:
                    break
                if isinstance(frame, bytes):
                    audio += frame
            assert ws.close_code == 1000
        assert len(audio) > 24000

        kid, payload, sig = minted["token"].rsplit(".", 2)
        past = tokens.SessionToken("acme", "heart", int(time.time()) - 100)
        expired = tokens.encode(KEYRING, past)
        cases = [
            ({"token": f"{kid}.{payload}.{'A' * len(sig)}"}, {}, 403, "bad_signature"),
            ({"token": expired}, {}, 410, "expired"),
            ({}, {}, 401, "missing_api_key"),
            ({}, {"Authorization": "Bearer nope-nope-nope-nope"}, 401, "invalid_api_key"),
            ({"token": minted["token"], "x": "1"}, {}, 400, "unknown_parameter"),
        ]
        for params, headers, status, code in cases:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await api.client.ws_connect("/v1/realtime/speech", params=params, headers=headers)
            assert caught.value.status == status
            async with api.client.get(
                "/v1/realtime/speech", params=params, headers=headers
            ) as plain:
                assert plain.status == status
                assert (await plain.json())["error"] == code
        # A valid key without an upgrade: 426.
        async with api.client.get(
            "/v1/realtime/speech", headers={"Authorization": f"Bearer {ACME}"}
        ) as plain:
            assert plain.status == 426
        for body, code in (
            ({"voice": "nobody"}, "unknown_voice"),
            ({"voice": "heart", "ttl": 0}, "bad_ttl"),
        ):
            async with api.client.post(
                "/v1/realtime/tokens", json=body, headers={"Authorization": f"Bearer {ACME}"}
            ) as resp:
                assert resp.status == 400 and (await resp.json())["error"] == code


async def test_a_token_expiring_mid_session_closes_it_with_1008(tmp_path: Path) -> None:
    async with realtime_node(tmp_path) as api:
        # Valid for about a second more, with the node's default 30 s of clock skew.
        soon = tokens.SessionToken("acme", "heart", int(time.time()) - 29)
        ws = await connect(api, token=tokens.encode(KEYRING, soon))
        got = await receive_all(ws)
        assert got.close_code == 1008
        await scrape_until(
            api.client,
            lambda m: (
                metric_from(m, "nearvoice_realtime_closes_total", reason="token_expired") == 1
            ),
        )


# -- bad input and limits -----------------------------------------------------------------


async def test_bad_messages_get_errors_and_nothing_reaches_the_engine(tmp_path: Path) -> None:
    async with realtime_node(tmp_path, max_message_bytes=2048) as api:
        renders = await synth_count(api)
        ws = await connect(api)
        await send(ws, "text.delta", text="Before the update.")
        await ws.send_str("{not json")
        await ws.send_str('{"type": "speak"}')
        await send(ws, "session.update", voice="nobody")
        await send(ws, "session.update", voice="heart", format="wav")
        await send(ws, "session.update", voice="heart", speed=9)
        await send(ws, "session.update", voice="heart", format="pcm")
        await send(ws, "text.delta", text="x" * 1500)  # over max_segment_chars (1000)
        await send(ws, "text.done")
        await send(ws, "text.delta", text="After done.")
        got = await receive_all(ws, until="done")
        codes = [e["error"] for e in got.of("error")]
        assert codes == [
            "no_session",
            "invalid_json",
            "unknown_type",
            "unknown_voice",
            "unsupported_format",
            "bad_speed",
            "segment_too_long",
        ]
        await ws.close()
        # Oversized and binary messages close the session.
        big = await connect(api)
        await big.send_str(json.dumps({"type": "text.delta", "text": "y" * 4000}))
        assert (await receive_all(big)).close_code == 1009
        binary = await connect(api)
        await binary.send_bytes(b"\x00\x01")
        assert (await receive_all(binary)).close_code == 1003
        assert await synth_count(api) == renders


async def test_tenant_limits_close_with_their_codes(tmp_path: Path) -> None:
    async with realtime_node(tmp_path, max_message_bytes=1024) as api:
        held = await connect(api, LIMITED)
        await send(held, "session.update", voice="heart", format="pcm")
        await receive_all(held, until="session.updated")
        second = await connect(api, LIMITED)
        assert (await receive_all(second)).close_code == 4003
        # Another tenant's sessions are not refused because of it.
        other = await connect(api, DRAFTY)
        await send(other, "session.update", voice="heart", format="pcm")
        assert (await receive_all(other, until="session.updated")).of("session.updated")
        await other.close()
        # 1 character per second, with a burst of one message (1024 bytes).
        await send(held, "text.delta", text="z" * 900)
        await send(held, "text.delta", text="z" * 900)
        got = await receive_all(held)
        assert got.close_code == 4001
        metrics = await scrape_until(
            api.client,
            lambda m: metric_from(m, "nearvoice_realtime_closes_total", reason="rate_limit") == 1,
        )
        assert (
            metric_from(metrics, "nearvoice_realtime_closes_total", reason="too_many_sessions") == 1
        )
        assert metric_from(metrics, "nearvoice_rate_limited_total", scope="realtime") == 1


async def test_idle_sessions_close_with_4002(tmp_path: Path) -> None:
    async with realtime_node(tmp_path, idle_timeout=0.2) as api:
        ws = await connect(api)
        await send(ws, "session.update", voice="heart", format="pcm")
        got = await receive_all(ws)
        assert got.of("session.updated") and got.close_code == 4002


# -- a reader that stops ----------------------------------------------------------------------


def _frame(text: str) -> bytes:
    """A masked client text frame (RFC 6455 section 5.2)."""
    payload = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_reader_that_stops_is_held_back_then_closed(tmp_path: Path) -> None:
    async with realtime_node(
        tmp_path, send_timeout=1.0, queue_frames=2, frame_bytes=4096, socket_send_buffer=4096
    ) as api:
        host, port = api.server.host, api.server.port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /v1/realtime/speech HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {ACME}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)  # the head only: no frame is read
        assert head.startswith(b"HTTP/1.1 101")
        long_text = " ".join(f"Sentence number {n} is here to make audio." for n in range(40))
        for message in (
            {"type": "session.update", "voice": "heart", "format": "pcm"},
            {"type": "text.delta", "text": long_text},
            {"type": "text.done"},
        ):
            await loop.sock_sendall(sock, _frame(json.dumps(message)))
        try:
            metrics = await scrape_until(
                api.client,
                lambda m: (
                    metric_from(m, "nearvoice_realtime_closes_total", reason="slow_reader") == 1
                ),
                seconds=60,
            )
        finally:
            sock.close()
        assert metric_from(metrics, "nearvoice_realtime_sessions") == 0


async def test_a_voice_this_node_does_not_render_comes_from_upstream(tmp_path: Path) -> None:
    async with realtime_node(tmp_path / "upstream") as upstream:
        config = realtime_config(tmp_path / "edge", upstreams=(upstream.base,))
        async with api_node(config, []) as edge:  # no engine: every segment goes upstream
            got = await speak(edge, "Fetched from upstream. Every segment of it.")
            assert got.close_code == 1000 and not got.of("error")
            assert [s["cache"] for s in got.of("segment.started")] == ["miss", "miss"]
            metrics = await edge.metrics()
            assert (
                metric_from(metrics, "nearvoice_upstream_requests_total", reason="no_engine") == 2
            )
            direct = await speak(upstream, "Fetched from upstream. Every segment of it.")
            assert direct.all_audio == got.all_audio
            assert [s["cache"] for s in direct.of("segment.started")] == ["hit", "hit"]
