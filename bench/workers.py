"""One render per key per node, whatever `--workers` is (edge.workers).

An edge runs with `--workers 2`. 100 keep-alive connections are opened first, and each
one asks `/admin/stats` which worker accepted it (the kernel spreads connections over the
workers with SO_REUSEPORT). Then, for several rounds, each with a fresh key, all 100
connections ask for that key at once. The same rounds run first against a one-worker edge,
the reference, where every follower joins the render in its own process. Reported:

* renders per key, from `nearvoice_synth_total` (the target is exactly 1), and the
  number of distinct bodies (1: every listener got the same bytes);
* first-byte times for followers in the key's owning worker (they join its render) and
  in the other worker (they read the fill it relays from the owner over the channel),
  p50 and p99, and the ratios of the other worker's p50 to the owner's and to the
  one-worker edge's: what the relay costs a listener.

Results: bench-results/workers/.

    nearvoice bench workers [--rounds 8] [--clients 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from nearvoice.bench.common import edge_process, free_port, write_results
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import resolve
from nearvoice.edge.workers import owner_of

ADMIN = "bench-workers-admin"
TEXT = (
    "Round {n} begins with a short sentence. "
    "Then a second one follows, so the render lasts a little while. "
    "And a third closes it."
)


@dataclass
class Client:
    """One raw keep-alive connection and the worker that accepted it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    worker: int = -1
    sent_at: float = 0.0
    first_at: float = 0.0
    body: bytes = b""
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    async def request(self, target: str, extra: str = "") -> None:
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode("latin-1"))
        self.sent_at = time.perf_counter()
        await self.writer.drain()
        await self._response()

    async def _response(self) -> None:
        line = await self.reader.readline()
        self.first_at = time.perf_counter()
        self.status = int(line.split()[1])
        self.headers = {}
        while (header := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "content-length" in self.headers:
            self.body = await self.reader.readexactly(int(self.headers["content-length"]))
            return
        out = bytearray()
        while True:  # chunked (RFC 9112 section 7.1)
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                break
            out += await self.reader.readexactly(size)
            await self.reader.readline()
        self.body = bytes(out)


def scrape(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def open_clients(port: int, count: int) -> list[Client]:
    clients = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = Client(reader, writer)
        await client.request("/admin/stats", f"Authorization: Bearer {ADMIN}\r\n")
        client.worker = int(json.loads(client.body)["worker"])
        clients.append(client)
    return clients


async def metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(reader, writer)
    await client.request("/metrics", "Connection: close\r\n")
    writer.close()
    return client.body.decode()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1e3, 1),
        "p99_ms": round(percentile(samples, 99) * 1e3, 1),
    }


@dataclass
class Rounds:
    """What one edge did over the rounds."""

    per_worker: dict[int, int]
    renders: list[float] = field(default_factory=list)
    distinct: list[int] = field(default_factory=list)
    owning: list[float] = field(default_factory=list)
    """Seconds to the first byte, followers in the key's owning worker."""
    other: list[float] = field(default_factory=list)
    """Seconds to the first byte, followers in the other workers (relayed)."""


async def edge_rounds(work: Path, workers: int, args: argparse.Namespace) -> Rounds:
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    voice = resolve("heart")
    port = free_port()
    env = {"NEARVOICE_KEYS": pair, "NEARVOICE_ADMIN_TOKEN": ADMIN}
    salt = os.urandom(4).hex()
    with edge_process(work / f"edge-{workers}", port, env, workers=workers) as base:
        clients = await open_clients(port, args.clients)
        done = Rounds({w: sum(c.worker == w for c in clients) for w in range(workers)})
        for n in range(args.rounds):
            spec = Spec.create(
                text=TEXT.format(n=f"{salt}-{n}"),
                voice=voice.name,
                format=AudioFormat.WAV,
                model=voice.model_id,
            )
            target = sign_url(keyring, base, spec, policy=Policy.HOT, ttl=3600)
            target = target[len(base) :]
            owner = owner_of(spec.key, workers)
            before = await metrics(port)
            await asyncio.gather(*(c.request(target) for c in clients))
            after = await metrics(port)
            assert all(c.status == 200 for c in clients), {c.status for c in clients}
            done.renders.append(
                scrape(after, "nearvoice_synth_total") - scrape(before, "nearvoice_synth_total")
            )
            done.distinct.append(len({hashlib.sha256(c.body).hexdigest() for c in clients}))
            for c in clients:
                (done.owning if c.worker == owner else done.other).append(c.first_at - c.sent_at)
        for c in clients:
            c.writer.close()
    return done


def _ratio(a: dict[str, float] | None, b: dict[str, float] | None) -> float | None:
    return round(a["p50_ms"] / b["p50_ms"], 2) if a and b else None


async def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="nv-bench-workers-"))
    try:
        # The reference: one worker, where every follower joins the render in-process.
        single = await edge_rounds(work, 1, args)
        several = await edge_rounds(work, args.workers, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    owning, other = summary(several.owning), summary(several.other)
    reference = summary(single.owning)
    return {
        "connections_per_worker": several.per_worker,
        "renders_per_key": several.renders,
        "exactly_one_render_every_round": all(r == 1 for r in several.renders),
        "distinct_bodies_per_key": several.distinct,
        "first_byte_owning_worker": owning,
        "first_byte_other_worker": other,
        "other_over_owning_p50": _ratio(other, owning),
        "reference_one_worker": {
            "renders_per_key": single.renders,
            "first_byte": reference,
        },
        "other_over_one_worker_p50": _ratio(other, reference),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench workers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=8, help="keys, each requested cold")
    parser.add_argument("--clients", type=int, default=100, help="concurrent connections")
    parser.add_argument("--workers", type=int, default=2, help="the edge's --workers")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    context = {"workers": args.workers, "clients": args.clients, "rounds": args.rounds}
    print(f"results: {write_results('workers', report, context)}")
    return 0  # a report, not a test (docs/benchmarks.md)


if __name__ == "__main__":
    raise SystemExit(main())
