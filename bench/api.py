"""The OpenAI-compatible speech API against its peers, measured in the same run with the
same client (the official `openai` SDK, and its own HTTP library for signed URLs).

One real `nearvoice edge` process renders `heart` (hibari) and `joe` (piper) itself
(`[synth] voices = ["heart", "joe"]`). First audio byte, p50 and p99, concurrency 1:

1. API against signed URLs, voice `heart`, mp3: cold (every text new) and repeated (the
   same texts again: cache hits). Requests alternate between the two doors, so both see
   the same machine load. Targets: API cold p50 <= 1.1x the signed URL's; API hit p50
   <= 1.2x a signed-URL hit.
2. The edge against tests/openai_tts_server.py (an OpenAI-compatible server rendering the
   same piper `joe` model, streaming each sentence as it is rendered), voice `joe`, pcm,
   both through the SDK: cold, and repeated (the peer has no cache and renders again).
   Target: the edge >= 3x faster to first byte than the peer.
3. Long texts keep ahead of playback: `--long` cold one-minute texts per voice (`heart`,
   `joe`), pcm through the SDK, played from the first byte in real time. Reported: the
   first byte, and the longest the audio ran dry before the next bytes came (a stall).
   Target: no stall over 50 ms (the realtime benchmark's jitter buffer).

Requests that render are paced: each starts `--pace` seconds (0.2 by default) after the
one before ends, so every server is measured at rest, as a player arriving at a quiet PoP
finds it (hits, which leave nothing behind, are not).
Back to back, one server's leftovers land on the other's next first byte: the peer's
onnxruntime threads spin on after each render (its default sessions), and the edge's
cold `joe` first byte measured 49 to 53 ms right after a peer request against 41 to 43 ms
paced, while the peer's measured the same either way (125 to 141 ms); alone, the edge
measures the same paced or not.

For reference only, not measured here: Kokoro-FastAPI documents about 300 ms to first
audio on a GPU. Timings on a shared, loaded machine are noisy; compare ratios, not
absolute numbers.

Results: bench-results/api/.

    nearvoice bench api [--requests 20] [--repeats 2] [--long 2] [--pace 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2
import openai

from nearvoice.bench.common import ROOT, child_env, edge_process, free_port, write_results
from nearvoice.bench.miss_latency import MINUTE, percentile, texts
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.stack import stop_processes
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import resolve

KOKORO_FASTAPI_GPU_FIRST_AUDIO_MS = 300  # documented by Kokoro-FastAPI; a reference only
PCM_BYTES_PER_SECOND = 24000 * 2
"""The speech API's pcm: 24 kHz, 16-bit, mono."""
STALL_LIMIT_MS = 50
"""A stall longer than this is one a player would hear (the realtime bench's jitter buffer)."""
Timed = Callable[[str], Awaitable[float]]


async def sdk_arrivals(
    sdk: openai.AsyncOpenAI, text: str, voice: str, fmt: str
) -> tuple[float, list[tuple[float, int]]]:
    """When the SDK call started, and when each piece of the body came and its bytes
    (the body is read to the end)."""
    started = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    async with sdk.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice=voice,
        input=text,
        response_format=fmt,  # type: ignore[arg-type]
    ) as response:
        async for chunk in response.iter_bytes():
            if chunk:
                arrivals.append((time.perf_counter(), len(chunk)))
    assert arrivals
    return started, arrivals


async def sdk_first_byte(sdk: openai.AsyncOpenAI, text: str, voice: str, fmt: str) -> float:
    """Seconds from the SDK call to the first audio byte; the body is read to the end."""
    started, arrivals = await sdk_arrivals(sdk, text, voice, fmt)
    return arrivals[0][0] - started


def longest_dry(arrivals: list[tuple[float, int]], bytes_per_second: float) -> float:
    """Seconds the audio ran dry at worst, played in real time from the first arrival:
    `arrivals` are (seconds, bytes) in the order they came. 0 when every byte came before
    its time to play."""
    if not arrivals:
        return 0.0
    start, have, worst = arrivals[0][0], 0, 0.0
    for at, size in arrivals:
        worst = max(worst, (at - start) - have / bytes_per_second)
        have += size
    return worst


async def sdk_stream(sdk: openai.AsyncOpenAI, text: str, voice: str) -> tuple[float, float, float]:
    """pcm through the SDK: seconds to the first byte, seconds the audio ran dry at worst,
    and the audio's seconds."""
    started, arrivals = await sdk_arrivals(sdk, text, voice, "pcm")
    audio = sum(size for _, size in arrivals) / PCM_BYTES_PER_SECOND
    return arrivals[0][0] - started, longest_dry(arrivals, PCM_BYTES_PER_SECOND), audio


async def url_first_byte(client: httpx2.AsyncClient, url: str) -> float:
    started = time.perf_counter()
    first = None
    async with client.stream("GET", url) as response:
        response.raise_for_status()
        async for chunk in response.aiter_bytes():
            if first is None and chunk:
                first = time.perf_counter() - started
    assert first is not None
    return first


async def post_first_byte(
    client: httpx2.AsyncClient, base: str, api_key: str, body: dict[str, object]
) -> float:
    """The API through the signed URLs' client (httpx2, which the SDK is built on): the
    same request as the SDK's, without the SDK's own work per call."""
    started = time.perf_counter()
    first = None
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/octet-stream"}
    async with client.stream(
        "POST", f"{base}/v1/audio/speech", json=body, headers=headers
    ) as response:
        response.raise_for_status()
        async for chunk in response.aiter_bytes():
            if first is None and chunk:
                first = time.perf_counter() - started
    assert first is not None
    return first


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1e3, 2),
        "p99_ms": round(percentile(samples, 99) * 1e3, 2),
    }


async def alternate(
    items: list[str], first: Timed, second: Timed, pace: float
) -> tuple[list[float], list[float]]:
    """Each item through both, alternating which goes first, so load drifts hit both;
    each request starts `pace` seconds after the one before it ended."""
    timings: tuple[list[float], list[float]] = ([], [])
    doors = (first, second)
    for i, item in enumerate(items):
        for which in (1, 0) if i % 2 else (0, 1):
            await asyncio.sleep(pace)
            timings[which].append(await doors[which](item))
    return timings


def start_peer() -> tuple[subprocess.Popen[str], str]:
    """tests/openai_tts_server.py in its own process; it prints its URL once serving."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_tts_server", "--port", str(free_port())],
        cwd=ROOT,  # tests/ is in the checkout only, beside the package
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        stop_processes([proc])
        raise SystemExit("the OpenAI-compatible peer did not start")
    return proc, str(json.loads(line)["url"])


async def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="nv-bench-api-"))
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    api_key = secrets.token_urlsafe(24)
    config = work / "edge.toml"
    config.write_text(
        '[synth]\nvoices = ["heart", "joe"]\n'
        f"workers = {args.synth_workers}\nort_threads = {args.ort_threads}\n"
    )
    env = {"NEARVOICE_KEYS": pair, "NEARVOICE_API_KEYS": f"bench:{api_key}"}
    heart = resolve("heart")
    report: dict[str, object] = {}
    peer_proc, peer_url = start_peer()
    try:
        with edge_process(work / "edge", free_port(), env, config=config) as base:
            edge_sdk = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)
            peer_sdk = openai.AsyncOpenAI(base_url=f"{peer_url}/v1", api_key="-", max_retries=0)
            async with httpx2.AsyncClient(timeout=60) as http, edge_sdk, peer_sdk:

                def signed(text: str) -> str:
                    spec = Spec.create(
                        text=f"{text} (URL)",
                        voice="heart",
                        format=AudioFormat.MP3,
                        model=heart.model_id,
                    )
                    return sign_url(keyring, base, spec, policy=Policy.HOT, ttl=3600)

                async def api_heart(text: str) -> float:
                    return await sdk_first_byte(edge_sdk, f"{text} (API)", "heart", "mp3")

                async def url_heart(text: str) -> float:
                    return await url_first_byte(http, signed(text))

                async def raw_heart(text: str) -> float:
                    body = {"model": "tts-1", "voice": "heart", "input": f"{text} (API)"}
                    return await post_first_byte(
                        http, base, api_key, {**body, "response_format": "mp3"}
                    )

                # Warm both doors and the peer (connections, the first render's caches).
                await api_heart("Warm up.")
                await url_heart("Warm up.")
                await sdk_first_byte(edge_sdk, "Warm up.", "joe", "pcm")
                await sdk_first_byte(peer_sdk, "Warm up.", "joe", "pcm")

                items = texts(args.requests, "heart")
                api_cold, url_cold = await alternate(items, api_heart, url_heart, args.pace)
                api_hit: list[float] = []
                url_hit: list[float] = []
                raw_hit: list[float] = []
                raw_url_hit: list[float] = []
                for _ in range(args.repeats):
                    # Hits leave nothing behind to wait out: not paced.
                    a, u = await alternate(items, api_heart, url_heart, 0.0)
                    api_hit += a
                    url_hit += u
                    a, u = await alternate(items, raw_heart, url_heart, 0.0)
                    raw_hit += a
                    raw_url_hit += u
                report["heart_mp3"] = {
                    "api_cold": summary(api_cold),
                    "signed_url_cold": summary(url_cold),
                    "api_hit": summary(api_hit),
                    "signed_url_hit": summary(url_hit),
                    "cold_p50_api_over_url": round(
                        statistics.median(api_cold) / statistics.median(url_cold), 2
                    ),
                    "hit_p50_api_over_url": round(
                        statistics.median(api_hit) / statistics.median(url_hit), 2
                    ),
                    "api_hit_plain_http": summary(raw_hit),
                    "signed_url_hit_same_pass": summary(raw_url_hit),
                    "hit_p50_plain_http_api_over_url": round(
                        statistics.median(raw_hit) / statistics.median(raw_url_hit), 2
                    ),
                }

                async def edge_joe(text: str) -> float:
                    return await sdk_first_byte(edge_sdk, text, "joe", "pcm")

                async def peer_joe(text: str) -> float:
                    return await sdk_first_byte(peer_sdk, text, "joe", "pcm")

                items = texts(args.requests, "joe")
                edge_cold, peer_cold = await alternate(items, edge_joe, peer_joe, args.pace)
                edge_hit: list[float] = []
                peer_again: list[float] = []
                for _ in range(args.repeats):
                    e, p = await alternate(items, edge_joe, peer_joe, args.pace)
                    edge_hit += e
                    peer_again += p
                report["joe_pcm_edge_vs_openai_peer"] = {
                    "edge_cold": summary(edge_cold),
                    "peer_cold": summary(peer_cold),
                    "edge_repeated": summary(edge_hit),
                    "peer_repeated": summary(peer_again),
                    "cold_p50_peer_over_edge": round(
                        statistics.median(peer_cold) / statistics.median(edge_cold), 2
                    ),
                    "repeated_p50_peer_over_edge": round(
                        statistics.median(peer_again) / statistics.median(edge_hit), 2
                    ),
                }

                streams: dict[str, object] = {}
                for voice in ("heart", "joe"):
                    runs = [
                        await sdk_stream(edge_sdk, f"{MINUTE} Long {voice}-{i}.", voice)
                        for i in range(args.long)
                    ]
                    streams[voice] = {
                        "first_byte": summary([first for first, _, _ in runs]),
                        "longest_dry_ms_max": round(max(dry for _, dry, _ in runs) * 1e3, 1),
                        "audio_seconds": round(statistics.median(a for _, _, a in runs), 1),
                    }
                report["long_text_pcm_streams"] = streams
    finally:
        stop_processes([peer_proc])
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench api", description=__doc__)
    parser.add_argument("--requests", type=int, default=20, help="distinct texts per voice")
    parser.add_argument("--repeats", type=int, default=2, help="repeated passes over them")
    parser.add_argument(
        "--long", type=int, default=2, help="one-minute texts per voice, for stalls"
    )
    parser.add_argument(
        "--synth-workers", type=int, default=0, help="the edge's [synth] workers (0: one per core)"
    )
    parser.add_argument("--ort-threads", type=int, default=1, help="the edge's [synth] ort_threads")
    parser.add_argument(
        "--pace", type=float, default=0.2, help="seconds between one request's end and the next"
    )
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    context = {
        "requests": args.requests,
        "repeats": args.repeats,
        "long": args.long,
        "pace_seconds": args.pace,
        "edge_synth": {"workers": args.synth_workers, "ort_threads": args.ort_threads},
        "targets": {
            "heart_mp3.cold_p50_api_over_url": 1.1,
            "heart_mp3.hit_p50_api_over_url": 1.2,
            "joe_pcm_edge_vs_openai_peer.cold_p50_peer_over_edge": 3.0,
            "long_text_pcm_streams.<voice>.longest_dry_ms_max": STALL_LIMIT_MS,
        },
        "reference_kokoro_fastapi_gpu_first_audio_ms": KOKORO_FASTAPI_GPU_FIRST_AUDIO_MS,
    }
    print(f"results: {write_results('api', report, context)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
