"""Cache-hit throughput: 64 KiB Range hits on a cached 1 MiB object, edge vs nginx.

Both servers hold the same bytes, run one worker each, and are loaded in the same run by
wrk in its own process, with the Range offset cycling over the object so no single answer
can be memoized by the load generator. The load generator must not be what limits a
server: before the rounds, each server gets more wrk threads and connections (doubling
both from `--connections` and one thread) until its throughput stops rising by more than
5 %, and every round then loads it at the level where it peaked. The sweep is part of the
results (`load_sweep`), with whether a plateau was reached before the largest level tried.

The figure that matters is the ratio of requests per second, edge / nginx: every round
loads each server in turn, and the report gives the median of the per-round ratios, which
a shared, noisy machine disturbs far less than any absolute number. A bare aiohttp server
slicing the same bytes from memory, with no checks at all, shows what aiohttp's request
machinery costs; the edge's fast path answers hits beneath it (edge/http/fastpath.py).

On a machine with two or more cores, every one-worker server (nginx, the edge, the bare
aiohttp handler) is pinned to CPU 0 and wrk to the other CPUs (`placement` in the
results): otherwise the scheduler sometimes puts a server and wrk on one core, and the same
server's throughput moves by half from one run to the next. `edge --workers N` is not
pinned (its workers need the cores), and neither is its wrk; `--no-pin` pins nothing.

With `--tls` the edge and nginx both terminate TLS with the same certificate and key
(from a development CA, edge.http.devca), HTTP/1.1 over TLS on keep-alive connections;
the target there is 0.6x nginx (0.8x in the clear). Every run also measures the limiter's
cost per hit in microseconds, with no `[limits]` and with limits that never refuse.
Results: bench-results/hit_path/ (hit_path_tls/ with `--tls`).

    nearvoice bench hit-path [--seconds 5] [--rounds 5] [--connections 16] [--workers 2] [--tls]
                             [--no-pin]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import ssl
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from nearvoice.bench.common import (
    WrkResult,
    edge_process,
    free_port,
    listening_pids,
    nginx,
    pin,
    python_server,
    run_wrk,
    write_results,
)
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.cache.store import DiskStore, StoreSettings
from nearvoice.edge.config import NodeConfig
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.handlers.speech import admission
from nearvoice.edge.http import devca
from nearvoice.edge.keyring import Keyring, generate_pair
from nearvoice.edge.limits import LimitSettings, Scope
from nearvoice.edge.node import Node
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import resolve

OBJECT_BYTES = 1024 * 1024
SLICE = 64 * 1024
RISE = 0.05
"""A load level that adds less than this fraction of throughput is a plateau."""
MAX_CONNECTIONS = 512
"""The largest load level the sweep tries."""
TARGETS = {False: 0.8, True: 0.6}
"""Edge / nginx throughput the edge aims at, in the clear and over TLS (a goal, not a
measurement)."""


def wrk_script(path: Path, target: str) -> None:
    """Cycles the Range over the 16 aligned 64 KiB slices of the object."""
    slices = OBJECT_BYTES // SLICE
    path.write_text(
        f"""
local i = 0
request = function()
  local start = (i % {slices}) * {SLICE}
  i = i + 1
  local range = "bytes=" .. start .. "-" .. (start + {SLICE} - 1)
  return wrk.format("GET", "{target}", {{Range = range}})
end
"""
    )


def fetch_range(
    url: str, start: int, end: int, tls: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end}"})
    with urllib.request.urlopen(request, timeout=10, context=tls) as response:
        return response.status, response.read()


def prepare(work: Path) -> tuple[bytes, Spec, Keyring, str]:
    body = random.Random(7).randbytes(OBJECT_BYTES)
    voice = resolve("heart")
    spec = Spec.create(
        text="The hit path benchmark object.",
        voice=voice.name,
        format=AudioFormat.WAV,
        model=voice.model_id,
    )
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    store = DiskStore(work / "edge" / "cache", StoreSettings())
    meta = ObjectMeta(
        key=spec.key,
        content_type="audio/wav",
        length=len(body),
        etag=etag_for(spec.key),
        sha256=hashlib.sha256(body).hexdigest(),
        policy=Policy.HOT,
        stored_at=time.time(),
        ttl=86400,
    )
    store.put(meta, body)
    store.close()
    (work / "www").mkdir()
    (work / "www" / "object.wav").write_bytes(body)
    return body, spec, keyring, pair


def _tls(work: Path) -> tuple[tuple[Path, Path, Path], Path, ssl.SSLContext]:
    """One certificate and key, from a development CA, for both servers; the edge's TOML
    turning TLS on; a client context trusting the CA (wrk itself does not verify)."""
    ca = devca.make_ca(work / "tls")
    leaf = devca.issue(ca, work / "tls", "server")
    config = work / "edge-tls.toml"
    config.write_text(f'[tls]\ncert = "{leaf.cert}"\nkey = "{leaf.key}"\n')
    return (leaf.cert, leaf.key, ca.cert), config, ssl.create_default_context(cafile=str(ca.cert))


def limiter_cost(calls: int = 200_000) -> dict[str, float]:
    """Microseconds per hit spent in signed URLs' admission (edge.handlers.speech), with
    no limit configured and with hit and miss limits that never refuse, in one process and
    with the buckets in the file a node's workers share: building the admission for a
    request and taking its hit tokens (per address and per key id)."""
    work = Path(tempfile.mkdtemp(prefix="nv-bench-limits-"))
    try:
        keyring = Keyring.parse(generate_pair())
        result: dict[str, float] = {}
        limits = LimitSettings(hit_rate=1e9, hit_burst=1e9, miss_rate=1e9, miss_burst=1e9)
        for name, settings, workers in (
            ("no limits", LimitSettings(), 1),
            ("limits", limits, 1),
            ("limits, buckets shared by 2 workers", limits, 2),
        ):
            config = NodeConfig(data_dir=work / str(workers), limits=settings, workers=workers)
            node = Node(config, keyring, renderer=None)
            clients = [f"198.51.100.{i % 250}" for i in range(calls)]
            started = time.perf_counter()
            for client in clients:
                admit = admission(node, client, "kid1", Policy.HOT, via_node=False)
                if admit is not None:
                    admit(Scope.HIT)
            result[name] = round((time.perf_counter() - started) / calls * 1e6, 3)
            node.close()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class Load:
    threads: int
    connections: int


SERVER_CPUS = {0}
"""Where one-worker servers run when pinned; wrk gets the other CPUs."""


def placement(pinned: bool) -> tuple[set[int] | None, set[int] | None]:
    """The CPUs for one-worker servers and for wrk; (None, None) when not pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pinned or len(cpus) < 2 or not set(cpus) >= SERVER_CPUS:
        return None, None
    return SERVER_CPUS, set(cpus) - SERVER_CPUS


def saturating_load(
    url: str, script: Path, args: argparse.Namespace, cpus: set[int] | None = None
) -> tuple[Load, dict[str, Any]]:
    """Doubles wrk's threads (up to the CPU count) and connections from one thread and
    `--connections` until the throughput rises by less than RISE; returns the level where
    it peaked, and the sweep (`plateau`: false if it was still rising at MAX_CONNECTIONS,
    when the figures may be the load generator's rather than the server's)."""
    max_threads = len(cpus) if cpus is not None else max(1, os.cpu_count() or 1)
    load = Load(1, args.connections)
    best: tuple[float, Load] | None = None
    steps: list[dict[str, float]] = []
    plateau = False
    while True:
        rps = run_wrk(
            url,
            seconds=args.sweep_seconds,
            connections=load.connections,
            threads=load.threads,
            script=script,
            cpus=cpus,
        ).rps
        steps.append({"threads": load.threads, "connections": load.connections, "rps": rps})
        if best is not None and rps < best[0] * (1 + RISE):
            plateau = True
            if rps > best[0]:
                best = (rps, load)
            break
        best = (rps, load)
        if load.connections * 2 > MAX_CONNECTIONS:
            break
        load = Load(min(load.threads * 2, max_threads, load.connections * 2), load.connections * 2)
    assert best is not None
    chosen = best[1]
    return chosen, {
        "steps": [{**step, "rps": round(step["rps"], 1)} for step in steps],
        "threads": chosen.threads,
        "connections": chosen.connections,
        "plateau": plateau,
    }


def measure(args: argparse.Namespace) -> dict[str, object]:
    """All servers stay up; each round runs wrk against each of them in turn, so a noisy
    neighbour slows every server alike, and the report takes the median over rounds."""
    work = Path(tempfile.mkdtemp(prefix="nv-bench-hit-"))
    work.chmod(0o755)  # nginx's worker runs unprivileged and must read the document root
    try:
        body, spec, keyring, pair = prepare(work)
        env = {"NEARVOICE_KEYS": pair}
        with contextlib.ExitStack() as stack:
            urls: dict[str, str] = {}
            pki, config, client_tls = _tls(work) if args.tls else (None, None, None)
            nginx_base = stack.enter_context(nginx(work / "www", free_port(), tls=pki))
            urls["nginx"] = f"{nginx_base}/object.wav"
            ca = pki[2] if pki else None
            edge = edge_process(work / "edge", free_port(), env, config=config, ca=ca)
            base = stack.enter_context(edge)
            urls["edge"] = sign_url(keyring, base, spec, policy=Policy.HOT, ttl=3600)
            if args.tls:
                pass  # edge and nginx, both terminating TLS with the same certificate
            elif args.workers > 1:
                multi_dir = work / "edge-multi"
                shutil.copytree(work / "edge", multi_dir)
                base = stack.enter_context(
                    edge_process(multi_dir, free_port(), env, workers=args.workers)
                )
                urls[f"edge --workers {args.workers}"] = sign_url(
                    keyring, base, spec, policy=Policy.HOT, ttl=3600
                )
            if not args.tls:
                bare_file = str(work / "www" / "object.wav")
                base = stack.enter_context(
                    python_server("nearvoice.bench.bare_aiohttp", bare_file, port=free_port())
                )
                urls["bare aiohttp handler"] = f"{base}/object.wav"

            server_cpus, wrk_cpus = placement(args.pin)
            on: dict[str, set[int] | None] = {name: None for name in urls}
            if server_cpus is not None:
                for name, url in urls.items():
                    if "--workers" not in name:
                        port = urlsplit(url).port
                        assert port is not None
                        pin(listening_pids(port), server_cpus)
                        on[name] = wrk_cpus
            scripts: dict[str, Path] = {}
            loads: dict[str, Load] = {}
            sweep: dict[str, object] = {}
            for name, url in urls.items():
                status, got = fetch_range(url, SLICE, 2 * SLICE - 1, client_tls)
                assert status == 206 and got == body[SLICE : 2 * SLICE], name
                target = urlsplit(url)
                scripts[name] = work / f"{len(scripts)}.lua"
                wrk_script(
                    scripts[name], f"{target.path}?{target.query}" if target.query else target.path
                )
                run_wrk(
                    url,
                    seconds=1,
                    connections=args.connections,
                    script=scripts[name],
                    cpus=on[name],
                )
                loads[name], sweep[name] = saturating_load(url, scripts[name], args, on[name])

            rounds: dict[str, list[WrkResult]] = {name: [] for name in urls}
            for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
                for name, url in urls.items():
                    rounds[name].append(
                        run_wrk(
                            url,
                            seconds=args.seconds,
                            connections=loads[name].connections,
                            threads=loads[name].threads,
                            script=scripts[name],
                            cpus=on[name],
                        )
                    )
        report: dict[str, object] = {
            "load_sweep": sweep,
            "placement": {
                name: {"server_cpus": sorted(server_cpus), "wrk_cpus": sorted(cpus)}
                if cpus is not None and server_cpus is not None
                else "unpinned"
                for name, cpus in on.items()
            },
        }
        for name, results in rounds.items():
            report[name] = {
                "rps": round(statistics.median(r.rps for r in results), 1),
                "p50_ms": round(statistics.median(r.p50_ms for r in results), 3),
                "p99_ms": round(statistics.median(r.p99_ms for r in results), 3),
                "non_2xx": sum(r.non_2xx for r in results),
                "errors": sum(r.errors for r in results),
                "rps_each_round": [round(r.rps) for r in results],
            }
        for name in rounds:
            if name != "nginx":
                ratios = [r.rps / n.rps for r, n in zip(rounds[name], rounds["nginx"], strict=True)]
                report[f"ratio {name} / nginx"] = round(statistics.median(ratios), 3)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench hit-path", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="per server per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--connections", type=int, default=16, help="the load sweep's first level (1 thread)"
    )
    parser.add_argument("--sweep-seconds", type=int, default=2, help="per load level")
    parser.add_argument("--workers", type=int, default=2, help="also run the edge with N workers")
    parser.add_argument(
        "--tls", action="store_true", help="edge and nginx both terminating TLS (same cert)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="leave one-worker servers and wrk wherever the scheduler puts them",
    )
    args = parser.parse_args(argv)
    report = measure(args)
    report["limiter_us_per_hit"] = limiter_cost()
    sweep = report["load_sweep"]
    assert isinstance(sweep, dict)
    print(f"{'server':<26}{'wrk -t/-c':>11}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}")
    for name, row in report.items():
        if isinstance(row, dict) and "rps" in row:
            load = f"{sweep[name]['threads']}/{sweep[name]['connections']}"
            load += "" if sweep[name]["plateau"] else "+"
            print(
                f"{name:<26}{load:>11}{row['rps']:>10.0f}{row['p50_ms']:>10.2f}"
                f"{row['p99_ms']:>10.2f}{row['non_2xx']:>9}"
            )
    if not all(s["plateau"] for s in sweep.values()):
        print("+: still rising at the largest load tried; that figure may be wrk's limit")
    print(f"median of per-round ratios over {args.rounds} rounds:")
    for name, value in report.items():
        if name.startswith("ratio "):
            target = TARGETS[bool(args.tls)]
            goal = f"  (target >= {target}x)" if name == "ratio edge / nginx" else ""
            print(f"  {name[6:]:<36}{value:>6.2f}x{goal}")
    print(f"limiter, microseconds per hit: {report['limiter_us_per_hit']}")
    context = {
        "tls": bool(args.tls),
        "object_bytes": OBJECT_BYTES,
        "range_bytes": SLICE,
        "seconds_per_run": args.seconds,
        "sweep_seconds_per_level": args.sweep_seconds,
        "rounds": args.rounds,
        "first_load_connections": args.connections,
        "target_edge_over_nginx": TARGETS[bool(args.tls)],
    }
    path = write_results("hit_path_tls" if args.tls else "hit_path", report, context)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
