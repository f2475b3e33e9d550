"""Realtime sessions against a real edge process, with a simulated language model.

One real `nearvoice edge` process renders `heart` (hibari). Each session streams a text
the way a language model writes it: 3-5 characters (seeded random) every 30 ms, across a
mix of texts, through aiohttp's WebSocket client, and "plays" the pcm it receives on a
real-time clock. Measured:

1. first audio of a session: from `session.update` to the first audio frame;
2. per segment, from the text byte that completed it (the whitespace after its sentence
   end, or `text.done`) to its first audio frame: p50 and p99;
3. whether a session's audio falls behind real time: playback starts at the first frame;
   a frame arriving after everything before it has played is a stall, unless the model had
   not yet written that segment's text (the listener waits for the model, not the node).
   A session is behind when one stall exceeds 50 ms (a small jitter buffer);
4. capacity: concurrent sessions (steps 5, 10, 20, 30, ...) until a session falls behind;
5. a segment's first audio against the signed URL's cold first byte for the same kind of
   phrase (one sentence, pcm), alternating between the two. Target: realtime p50 <= 1.2x.

For reference only, not measured here: VibeVoice-Realtime publishes about 300 ms to its
first audio chunk on a T4 GPU, one session per process. Timings on a shared, loaded
machine are noisy; compare ratios, not absolute numbers.

Results: bench-results/realtime/.

    nearvoice bench realtime [--compare 12] [--max-sessions 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from nearvoice.bench.common import edge_process, free_port, write_results
from nearvoice.bench.miss_latency import SENTENCES, percentile
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import resolve

VIBEVOICE_REALTIME_T4_FIRST_CHUNK_MS = 300  # published by VibeVoice-Realtime; reference only
PIECE = (3, 5)  # characters per simulated model token
EVERY = 0.030  # seconds between pieces
STALL_TOLERANCE = 0.050  # seconds a frame may be late before a session counts as behind
STEPS = (5, 10, 20, 30, 40, 50, 60, 80, 100)
RATE = 24000  # heart's sample rate, pcm s16le


def session_texts(count: int, salt: str) -> list[str]:
    """Distinct mixed texts (every sentence new, so every segment is a render): a
    clause-led first sentence, then three or four sentences of varied length."""
    out = []
    for i in range(count):
        picked = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(4)]
        body = " ".join(f"{s[:-1]} for listener {salt} {i}{s[-1]}" for s in picked[: 3 + i % 2])
        tag = f"{salt} {i}"
        out.append(f"Well, here is answer {tag} for you, as asked in message {tag}. {body}")
    return out


@dataclass
class SessionResult:
    first_audio: float | None = None
    """Seconds from session.update to the first audio frame."""
    segment_latency: list[float] = field(default_factory=list)
    max_stall: float = 0.0
    audio_seconds: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)
    caches: dict[str, int] = field(default_factory=dict)


async def run_session(
    http: aiohttp.ClientSession, base: str, key: str, text: str, rng: random.Random
) -> SessionResult:
    result = SessionResult()
    sent = ""
    pieces: list[tuple[int, float]] = []  # (end offset, time sent)
    done_at: list[float] = []
    url = base.replace("http://", "ws://") + "/v1/realtime/speech"
    async with http.ws_connect(url, headers={"Authorization": f"Bearer {key}"}) as ws:
        updated_at = time.perf_counter()
        await ws.send_str(json.dumps({"type": "session.update", "voice": "heart", "format": "pcm"}))

        async def model() -> None:
            nonlocal sent
            position = 0
            while position < len(text):
                size = rng.randint(*PIECE)
                chunk = text[position : position + size]
                position += len(chunk)
                await ws.send_str(json.dumps({"type": "text.delta", "text": chunk}))
                sent += chunk
                pieces.append((len(sent), time.perf_counter()))
                await asyncio.sleep(EVERY)
            await ws.send_str(json.dumps({"type": "text.done"}))
            done_at.append(time.perf_counter())

        writer: asyncio.Task[None] | None = None
        cursor = 0
        completed: float | None = None
        playhead: float | None = None
        awaiting_first = False
        async for msg in ws:
            now = time.perf_counter()
            if msg.type is aiohttp.WSMsgType.BINARY:
                if result.first_audio is None:
                    result.first_audio = now - updated_at
                if awaiting_first and completed is not None:
                    result.segment_latency.append(now - completed)
                    awaiting_first = False
                duration = len(msg.data) / 2 / RATE
                if playhead is None or now <= playhead:
                    playhead = (playhead or now) + duration
                else:
                    # Late: count it only if this segment's text was complete in time.
                    if completed is not None and completed < playhead:
                        result.max_stall = max(result.max_stall, now - playhead)
                    playhead = now + duration
                result.audio_seconds += duration
                continue
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            event = json.loads(msg.data)
            if event["type"] == "session.updated" and writer is None:
                writer = asyncio.create_task(model())  # the model starts writing now
            elif event["type"] == "segment.started":
                at = sent.find(event["text"], cursor)
                end = at + len(event["text"]) if at >= 0 else len(sent)
                cursor = end
                # The byte that completed it: the next one sent, or text.done.
                completed = next((t for e, t in pieces if e > end), None)
                if completed is None:
                    completed = done_at[0] if done_at else now
                awaiting_first = True
                result.caches[event["cache"]] = result.caches.get(event["cache"], 0) + 1
            elif event["type"] == "error":
                result.errors.append(event)
        if writer is not None:
            await writer
    return result


async def compare(
    http: aiohttp.ClientSession, base: str, key: str, keyring: Keyring, count: int
) -> dict[str, Any]:
    """One-sentence phrases, cold: a realtime segment's first audio (from text.done) and
    a signed URL's first byte, alternating."""
    heart = resolve("heart", None)
    realtime: list[float] = []
    signed: list[float] = []
    url = base.replace("http://", "ws://") + "/v1/realtime/speech"
    salt = secrets.token_hex(3)
    for i in range(count):
        sentence = SENTENCES[i % len(SENTENCES)].rstrip(".")
        async with http.ws_connect(url, headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send_str(json.dumps({"type": "session.update", "voice": "heart"}))
            await ws.receive()
            text = f"{sentence}, reference {salt} r{i}."
            await ws.send_str(json.dumps({"type": "text.delta", "text": text}))
            started = time.perf_counter()
            await ws.send_str(json.dumps({"type": "text.done"}))
            first = None
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY and first is None:
                    first = time.perf_counter() - started
                elif msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    break
            assert first is not None
            realtime.append(first)
        spec = Spec.create(
            text=f"{sentence}, reference {salt} u{i}.",
            voice="heart",
            format=AudioFormat.PCM,
            model=heart.model_id,
        )
        signed_url = sign_url(keyring, base, spec, policy=Policy.HOT, ttl=600)
        started = time.perf_counter()
        async with http.get(signed_url) as response:
            response.raise_for_status()
            await response.content.readany()
            signed.append(time.perf_counter() - started)
            await response.read()
    p50_rt, p50_url = statistics.median(realtime), statistics.median(signed)
    return {
        "realtime_first_audio_ms": summary(realtime),
        "signed_url_cold_first_byte_ms": summary(signed),
        "ratio_p50": round(p50_rt / p50_url, 3),
    }


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(samples) * 1000, 1),
        "p99": round(percentile(samples, 99) * 1000, 1),
        "n": len(samples),
    }


async def level(
    http: aiohttp.ClientSession, base: str, key: str, sessions: int, texts: list[str], seed: int
) -> dict[str, Any]:
    rngs = [random.Random(seed * 1000 + i) for i in range(sessions)]
    results = await asyncio.gather(
        *(run_session(http, base, key, texts[i], rngs[i]) for i in range(sessions))
    )
    caches: dict[str, int] = {}
    for r in results:
        for name, n in r.caches.items():
            caches[name] = caches.get(name, 0) + n
    latencies = [x for r in results for x in r.segment_latency]
    firsts = [r.first_audio for r in results if r.first_audio is not None]
    behind = sum(1 for r in results if r.max_stall > STALL_TOLERANCE)
    return {
        "behind": behind,
        "max_stall_ms": round(max(r.max_stall for r in results) * 1000, 1),
        "first_audio_from_update_ms": summary(firsts),
        "segment_first_audio_ms": summary(latencies),
        "errors": sum(len(r.errors) for r in results),
        "segments_by_cache": caches,
        "audio_seconds": round(sum(r.audio_seconds for r in results), 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pair = generate_pair()
    api_key = secrets.token_urlsafe(24)
    env = {"NEARVOICE_KEYS": pair, "NEARVOICE_API_KEYS": f"bench:{api_key}"}
    keyring = Keyring.parse(pair)
    work = Path(tempfile.mkdtemp(prefix="nv-bench-realtime-"))
    config = work / "edge.toml"
    config.write_text(
        "[api.tenants.bench]\n"
        f"realtime_sessions = {max(STEPS) + 10}\n"
        "[realtime]\n"
        "idle_timeout = 120.0\n"
    )
    report: dict[str, Any] = {}
    try:
        with edge_process(work / "edge", free_port(), env, config=config) as base:
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                report["compare"] = await compare(http, base, api_key, keyring, args.compare)
                single = await level(http, base, api_key, 1, session_texts(1, "solo"), seed=1)
                report["one_session"] = single
                steps: dict[str, dict[str, Any]] = {}
                held = 0
                for n in (s for s in STEPS if s <= args.max_sessions):
                    found = await level(http, base, api_key, n, session_texts(n, f"c{n}"), seed=n)
                    steps[str(n)] = found  # by concurrent sessions, the step tried
                    print(json.dumps({"sessions": n, **found}), flush=True)
                    if found["behind"] or found["errors"]:
                        break
                    held = n
                report["steps"] = steps
                report["sessions_held_in_real_time"] = held
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench realtime", description=__doc__)
    parser.add_argument("--compare", type=int, default=12, help="phrases in the comparison")
    parser.add_argument("--max-sessions", type=int, default=60, help="highest step tried")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    context = {
        "voice": "heart",
        "format": "pcm",
        "compare_phrases": args.compare,
        "max_sessions": args.max_sessions,
        "model_pieces": f"{PIECE[0]}-{PIECE[1]} characters every {EVERY * 1000:.0f} ms",
        "stall_tolerance_ms": STALL_TOLERANCE * 1000,
        "target_compare_ratio_p50": 1.2,
        "reference_vibevoice_realtime_t4_first_chunk_ms": VIBEVOICE_REALTIME_T4_FIRST_CHUNK_MS,
    }
    print(f"results: {write_results('realtime', report, context)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
