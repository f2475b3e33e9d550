"""Origin offload: a Zipf(1.0) workload over `--keys` keys replayed through 2 edges, 1
shield and the origin.

Four real processes on loopback, each with its own data directory in a temporary
directory that is removed at the end: the origin (`--config` with `[origin] public_base`
set to edge 1 and a filesystem object store; it renders `heart` and `joe`), one shield
(`--upstream origin`, synthesis off) and two edges (`--upstream shield`, which render only
`heart`). Secrets come from the environment, generated for the run.

The workload uses voice `joe`, which only the origin renders, so every edge miss travels
edge -> shield -> origin and each tier's cache matters. Key i is the text
f"Item number {i}." (short, so thousands of renders fit in minutes); every key's URL is
signed once per edge with the same spec, so both edges and the shield share one object per
key. Request keys are drawn from Zipf(1.0) over the keys (probability proportional to
1/rank, numpy, fixed seed); each request goes to one of the two edges at random, as
players land on either. `--clients` concurrent aiohttp clients replay the sequence, each
request reading its whole body.

What it reports, from every node's /metrics (final scrape minus a baseline scrape taken
after a warm-up on keys outside the workload):

* per tier (each edge, both edges combined, the shield, the origin): requests by result
  (hit, miss, collapsed, stale, error, ...); request hit ratio = hit / (hit + miss +
  collapsed), so a request that joined a fill already in flight (collapsed) counts as not
  a hit, though it caused no extra upstream request or render; byte hit ratio = body bytes
  from cache / all body bytes (`nearvoice_response_bytes_total{source}`);
  the requests a tier received (from players, or the fetches of the tier in front of it,
  `nearvoice_upstream_requests_total`) and the fetches it sent on, so `offload` = 1 -
  sent / received, the fraction of its traffic the next tier never saw (collapsed
  requests count as offloaded here). `extra_requests` = requests counted - requests
  received: the node-signed HEADs with which a node confirms an object it streamed from
  its upstream while the object was still in flight there (edge.upstream.verify). They
  carry no body, so byte ratios are exact, but they are counted as hit or collapsed, in a
  split /metrics does not tell; `get_request_hit_ratio` gives the bounds of the hit ratio
  of the GETs alone (tight when few requests collapse), and the table shows it as
  "GET hit". The results name the device and the commit measured, and any uncommitted
  node code (`context.uncommitted`).
* renders: the origin's `nearvoice_synth_total{engine="piper"}` against the number of
  distinct keys in the workload (the target is equal), and renders at the edges and
  the shield (the target is zero): `duplicates` is every render beyond one per key.
* first byte: the edges' own `nearvoice_ttfb_seconds` histograms, merged, give p50 and
  p99 per result, estimated from the buckets by linear interpolation as Prometheus's
  histogram_quantile does (a player cannot see which result its request had). The
  client's own first-byte times give the overall p50/p99, and split by what the client
  can know for certain: `repeat` requests were sent after an earlier request for the same
  key on the same edge had finished (so a hit, unless evicted), `first` requests were the
  first for their key on that edge (so an edge miss), and `overlap` requests were sent
  while an earlier one for the key on that edge was still running (collapsed, or a hit).
* client: statuses, and the body bytes received, checked against the edges' byte counters.

Byte hit ratios come out below request hit ratios because the rarer keys have larger
numbers in their text, so longer audio. The hit histogram's lowest bucket is 0.5 ms, so a
hit p50 below that is an interpolation, not a measurement.

The run's length is dominated by the origin's renders, one per distinct key drawn (the
results count them): more requests draw more of the keys, and each costs a render.

    nearvoice bench offload                      # --keys 5000 --requests 15000 --clients 16
    nearvoice bench offload --requests 100000    # nearly every key drawn

Results: bench-results/offload/<UTC>.json, and a chart beside it (.png) when matplotlib is
installed (the export extra has it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from nearvoice.bench.common import ROOT, child_env, free_port, write_results
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import KEYS_ENV, Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.stack import stop_processes
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import resolve

VOICE = "joe"  # rendered only at the origin, so misses cross every tier
READY_TIMEOUT = 180.0  # seconds for all four nodes to load and warm their engines
STOP_TIMEOUT = 20.0
URL_TTL = 6 * 3600  # seconds the pre-signed URLs stay valid
RESULTS_SHOWN = ("hit", "miss", "collapsed", "stale", "error")
TIER_ORDER = ("edge1", "edge2", "edges", "shield", "origin")


def text_for(index: int) -> str:
    return f"Item number {index}."


# -- processes ------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    role: str
    port: int
    data_dir: Path
    extra: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _wait_ready(node: Node, deadline: float) -> None:
    assert node.proc is not None
    url = f"{node.base}/readyz"
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            log = (node.data_dir / "node.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{node.name} exited with {node.proc.returncode}:\n{log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{node.name} was not ready within {READY_TIMEOUT:.0f} s")


@contextlib.contextmanager
def stack(work: Path, env: dict[str, str]) -> Iterator[dict[str, Node]]:
    """Origin, shield and two edges as real `nearvoice` processes, started together and
    always stopped (edges first)."""
    ports = [free_port() for _ in range(4)]
    origin = Node("origin", "origin", ports[0], work / "origin", [])
    shield = Node("shield", "shield", ports[1], work / "shield", ["--upstream", origin.base])
    edges = [
        Node(f"edge{i + 1}", "edge", port, work / f"edge{i + 1}", ["--upstream", shield.base])
        for i, port in enumerate(ports[2:])
    ]
    config = work / "origin.toml"
    config.write_text(
        f'[origin]\npublic_base = "{edges[0].base}"\n'
        f'store = "{(origin.data_dir / "objects").resolve()}"\n'
    )
    origin.extra = ["--config", str(config)]
    nodes = [origin, shield, *edges]
    logs = []
    try:
        for node in nodes:
            node.data_dir.mkdir(parents=True)
            log = (node.data_dir / "node.log").open("wb")
            logs.append(log)
            cmd = [
                sys.executable, "-m", "nearvoice.edge.cli", node.role, "--port", str(node.port),
                "--data-dir", str(node.data_dir), *node.extra,
            ]  # fmt: skip
            node.proc = subprocess.Popen(cmd, env=child_env(env), stdout=log, stderr=log)
        deadline = time.monotonic() + READY_TIMEOUT
        for node in nodes:
            _wait_ready(node, deadline)
        yield {node.name: node for node in nodes}
    finally:
        stop_processes([n.proc for n in reversed(nodes) if n.proc is not None], STOP_TIMEOUT)
        for log in logs:
            log.close()


# -- metrics --------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("nearvoice_"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def delta(after: Samples, before: Samples) -> Samples:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def merge(*parts: Samples) -> Samples:
    out: Samples = defaultdict(float)
    for part in parts:
        for k, v in part.items():
            out[k] += v
    return dict(out)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (sample, labels), value in samples.items():
        if sample == name:
            out[dict(labels).get(label, "")] += value
    return dict(out)


def total(samples: Samples, name: str) -> float:
    return sum(v for (sample, _), v in samples.items() if sample == name)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's estimate from cumulative (upper bound, count) buckets: linear within the
    bucket holding the q-th observation; the last finite bound if it lies in +Inf."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def ttfb_by_result(samples: Samples) -> dict[str, dict[str, float | int | None]]:
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (sample, labels), value in samples.items():
        if sample == "nearvoice_ttfb_seconds_bucket":
            d = dict(labels)
            buckets[d["result"]].append((float(d["le"]), value))
    out: dict[str, dict[str, float | int | None]] = {}
    for result, series in sorted(buckets.items()):
        count = max(c for _, c in series)
        if count <= 0:
            continue
        p50, p99 = histogram_quantile(0.5, series), histogram_quantile(0.99, series)
        out[result] = {
            "n": int(count),
            "p50_ms": None if p50 is None else round(p50 * 1e3, 2),
            "p99_ms": None if p99 is None else round(p99 * 1e3, 2),
        }
    return out


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def tier_figures(samples: Samples, received: float, *, upstream: bool = True) -> dict[str, object]:
    """Requests by result, hit ratios and traffic of one tier (or a sum of nodes)."""
    results = by_label(samples, "nearvoice_requests_total", "result")
    counted = {r: int(results.get(r, 0)) for r in RESULTS_SHOWN}
    counted.update({r: int(v) for r, v in results.items() if r not in counted and v})
    hit, miss, collapsed = counted["hit"], counted["miss"], counted["collapsed"]
    sources = {
        s: int(v) for s, v in by_label(samples, "nearvoice_response_bytes_total", "source").items()
    }
    sent = int(total(samples, "nearvoice_upstream_requests_total"))
    extra = max(0, sum(counted.values()) - int(received))
    # The extra requests (verify HEADs) were answered as hit or collapsed, in a split the
    # counters do not tell; these are the bounds on the GETs' own hits.
    get_hits = (hit - min(extra, hit), hit - max(0, extra - collapsed))
    get_total = hit + miss + collapsed - extra
    return {
        "requests": counted,
        "request_hit_ratio": _ratio(hit, hit + miss + collapsed),
        "byte_hit_ratio": _ratio(sources.get("cache", 0), sum(sources.values())),
        "response_bytes": sources,
        "received": int(received),
        "extra_requests": extra,
        "get_hits": list(get_hits),
        "get_request_hit_ratio": [_ratio(h, get_total) for h in get_hits],
        "upstream_requests": sent,
        "offload": _ratio(received - sent, received) if upstream else None,
        "renders": {
            k: int(v) for k, v in by_label(samples, "nearvoice_synth_total", "engine").items() if v
        },
    }


# -- workload -------------------------------------------------------------------------------


def zipf_sequence(keys: int, requests: int, seed: int, edges: int) -> tuple[np.ndarray, np.ndarray]:
    """Key indices drawn from Zipf(1.0) over `keys` (rank r has probability proportional to
    1/r; index 0 is rank 1), and the edge each request lands on, uniformly at random."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1)
    chosen = rng.choice(keys, size=requests, p=weights / weights.sum())
    landing = rng.integers(0, edges, size=requests)
    return chosen, landing


@dataclass
class ClientLog:
    ttfb: list[float] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    body_bytes: int = 0
    failures: list[str] = field(default_factory=list)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, float, int]:
    """Status, seconds to the first body byte, body length."""
    started = time.perf_counter()
    async with session.get(url) as response:
        first = await response.content.readany()
        ttfb = time.perf_counter() - started
        rest = await response.read()
        return response.status, ttfb, len(first) + len(rest)


async def replay(
    urls: list[list[str]],
    chosen: np.ndarray,
    landing: np.ndarray,
    clients: int,
) -> tuple[ClientLog, float]:
    log = ClientLog()
    done: set[tuple[int, int]] = set()  # (edge, key) with a finished request
    sent: set[tuple[int, int]] = set()  # (edge, key) with a request sent
    order = iter(range(len(chosen)))
    progress = tqdm(total=len(chosen), desc="zipf replay", unit="req")
    timeout = aiohttp.ClientTimeout(total=120)

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:

        async def client() -> None:
            for i in order:
                key, edge = int(chosen[i]), int(landing[i])
                pair = (edge, key)
                kind = "repeat" if pair in done else "overlap" if pair in sent else "first"
                sent.add(pair)
                try:
                    status, ttfb, size = await fetch(session, urls[key][edge])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.failures.append(f"{type(exc).__name__}: {exc}")
                    log.statuses[0] += 1
                else:
                    log.statuses[status] += 1
                    if status == 200:
                        log.ttfb.append(ttfb)
                        log.kind.append(kind)
                        log.body_bytes += size
                        done.add(pair)
                progress.update()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
    progress.close()
    return log, wall


def percentiles_ms(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values)
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(arr, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(arr, 99)) * 1e3, 2),
        "max_ms": round(float(arr.max()) * 1e3, 2),
    }


async def scrape_all(nodes: dict[str, Node]) -> dict[str, Samples]:
    async with aiohttp.ClientSession() as session:

        async def one(node: Node) -> tuple[str, Samples]:
            async with session.get(f"{node.base}/metrics") as response:
                response.raise_for_status()
                return node.name, parse_metrics(await response.text())

        return dict(await asyncio.gather(*(one(n) for n in nodes.values())))


async def warm_up(keyring: Keyring, edges: list[Node], count: int = 4) -> None:
    """A few renders through every edge on keys outside the workload: connections between
    the tiers are open and every engine has run before the baseline scrape."""
    voice = resolve(VOICE)
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            spec = Spec.create(
                text=f"Warm up number {i}.",
                voice=voice.name,
                format=AudioFormat.WAV,
                model=voice.model_id,
            )
            for edge in edges:
                url = sign_url(keyring, edge.base, spec, policy=Policy.HOT, ttl=URL_TTL)
                status, _, _ = await fetch(session, url)
                if status != 200:
                    raise RuntimeError(f"warm-up request to {edge.name} answered {status}")


# -- the run --------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, work: Path) -> dict[str, object]:
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    env = {
        KEYS_ENV: pair,
        ADMIN_TOKEN_ENV: secrets.token_urlsafe(24),
        "NEARVOICE_LOG_LEVEL": "WARNING",
    }
    chosen, landing = zipf_sequence(args.keys, args.requests, args.seed, edges=2)
    distinct = np.unique(chosen)
    voice = resolve(VOICE)

    started = time.perf_counter()
    with stack(work, env) as nodes:
        startup = time.perf_counter() - started
        edges = [nodes["edge1"], nodes["edge2"]]
        urls: list[list[str]] = []
        for i in tqdm(range(args.keys), desc="signing", unit="key"):
            spec = Spec.create(
                text=text_for(i), voice=voice.name, format=AudioFormat.WAV, model=voice.model_id
            )
            urls.append(
                [sign_url(keyring, e.base, spec, policy=Policy.HOT, ttl=URL_TTL) for e in edges]
            )
        await warm_up(keyring, edges)
        before = await scrape_all(nodes)
        log, wall = await replay(urls, chosen, landing, args.clients)
        after = await scrape_all(nodes)

    d = {name: delta(after[name], before[name]) for name in after}
    d["edges"] = merge(d["edge1"], d["edge2"])
    fetched = {name: total(d[name], "nearvoice_upstream_requests_total") for name in d}
    tiers = {
        "edge1": tier_figures(d["edge1"], int((landing == 0).sum())),
        "edge2": tier_figures(d["edge2"], int((landing == 1).sum())),
        "edges": tier_figures(d["edges"], len(landing)),
        "shield": tier_figures(d["shield"], fetched["edges"]),
        "origin": tier_figures(d["origin"], fetched["shield"], upstream=False),
    }

    origin_renders = int(by_label(d["origin"], "nearvoice_synth_total", "engine").get("piper", 0))
    elsewhere = {
        name: int(total(d[name], "nearvoice_synth_total")) for name in ("edge1", "edge2", "shield")
    }
    other_origin = int(total(d["origin"], "nearvoice_synth_total")) - origin_renders
    all_renders = origin_renders + other_origin + sum(elsewhere.values())
    unique = len(distinct)

    edge_bytes = by_label(d["edges"], "nearvoice_response_bytes_total", "source")
    kinds: dict[str, list[float]] = defaultdict(list)
    for ttfb, kind in zip(log.ttfb, log.kind, strict=True):
        kinds[kind].append(ttfb)

    return {
        "workload": {
            "distinct_keys_requested": unique,
            "requests_per_edge": [int((landing == e).sum()) for e in range(2)],
        },
        "wall_seconds": {
            "startup": round(startup, 1),
            "replay": round(wall, 1),
            "requests_per_second": round(args.requests / wall, 1),
        },
        "client": {
            "statuses": {str(k): v for k, v in sorted(log.statuses.items())},
            "failures": log.failures[:10],
            "body_bytes": log.body_bytes,
            "body_bytes_match_edges": log.body_bytes == sum(edge_bytes.values()),
            "ttfb": percentiles_ms(log.ttfb),
            "ttfb_by_client_view": {k: percentiles_ms(v) for k, v in sorted(kinds.items())},
        },
        "tiers": tiers,
        "renders": {
            "origin_piper": origin_renders,
            "unique_keys_requested": unique,
            "equal": origin_renders == unique and all_renders == unique,
            "duplicates": all_renders - unique,
            "origin_other_engines": other_origin,
            "elsewhere": elsewhere,
        },
        "ttfb_by_result_edges": ttfb_by_result(d["edges"]),
    }


def uncommitted() -> list[str]:
    """Node code changed on top of the commit measured, in a checkout (the nodes run the
    working tree); empty from an installed package."""
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "edge", "origin"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return []
    return [line[3:] for line in result.stdout.splitlines() if line.strip()]


# -- output ---------------------------------------------------------------------------------


def _pct(value: object) -> str:
    return f"{value * 100:6.2f}%" if isinstance(value, float) else "     - "


def _span(bounds: object) -> str:
    assert isinstance(bounds, list)
    low, high = bounds
    if low == high:
        return f"{_pct(low):>15}"
    return f"{_pct(low).strip()}-{_pct(high).strip():>7}".rjust(15)


def print_report(report: dict[str, object], args: argparse.Namespace) -> None:
    w = report["workload"]
    assert isinstance(w, dict)
    print(
        f"\nworkload: Zipf(1.0) over --keys {args.keys}, --requests {args.requests}, "
        f"--clients {args.clients}, 2 edges; measured: {w['distinct_keys_requested']} "
        "distinct keys drawn\n"
    )
    header = f"{'tier':8} {'hit':>7} {'miss':>6} {'coll':>5} {'stale':>5} {'err':>4}"
    header += f" {'req hit':>8} {'GET hit':>15} {'byte hit':>8} {'received':>8} {'HEADs':>6}"
    header += f" {'upstream':>8} {'offload':>8}"
    print(header)
    tiers = report["tiers"]
    assert isinstance(tiers, dict)
    for name in TIER_ORDER:
        t = tiers[name]
        r = t["requests"]
        print(
            f"{name:8} {r['hit']:7d} {r['miss']:6d} {r['collapsed']:5d} {r['stale']:5d}"
            f" {r['error']:4d} {_pct(t['request_hit_ratio']):>8}"
            f" {_span(t['get_request_hit_ratio'])} {_pct(t['byte_hit_ratio']):>8}"
            f" {t['received']:8d} {t['extra_requests']:6d} {t['upstream_requests']:8d}"
            f" {_pct(t.get('offload')):>8}"
        )
    renders = report["renders"]
    assert isinstance(renders, dict)
    verdict = "equal" if renders["equal"] else f"NOT equal ({renders['duplicates']} duplicates)"
    print(
        f"\norigin renders {renders['origin_piper']} vs unique keys "
        f"{renders['unique_keys_requested']}: {verdict}; renders elsewhere {renders['elsewhere']}"
    )
    print("\nfirst byte at the edges, by result (from their histograms):")
    by_result = report["ttfb_by_result_edges"]
    assert isinstance(by_result, dict)
    for result, f in by_result.items():
        print(f"  {result:10} n={f['n']:6d}  p50 {f['p50_ms']:8} ms  p99 {f['p99_ms']:8} ms")
    client = report["client"]
    assert isinstance(client, dict)
    print("first byte at the client:")
    rows = {"all": client["ttfb"], **client["ttfb_by_client_view"]}
    for kind, f in rows.items():
        if f["n"]:
            print(f"  {kind:10} n={f['n']:6d}  p50 {f['p50_ms']:8} ms  p99 {f['p99_ms']:8} ms")
    match = "match" if client["body_bytes_match_edges"] else "DO NOT match"
    print(
        f"statuses {client['statuses']}; {client['body_bytes']} body bytes ({match} the edges'"
        f" counters); seconds {report['wall_seconds']}"
    )


def plot(report: dict[str, object], path: Path) -> bool:
    """Request and byte hit ratio per tier, if matplotlib is importable (it is no dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tiers = report["tiers"]
    assert isinstance(tiers, dict)
    names = list(TIER_ORDER)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for offset, metric, label in (
        (-0.2, "request_hit_ratio", "request"),
        (0.2, "byte_hit_ratio", "byte"),
    ):
        ax.bar(x + offset, [tiers[n][metric] or 0 for n in names], 0.4, label=f"{label} hit ratio")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("nearvoice offload: Zipf(1.0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench offload", description=__doc__)
    parser.add_argument("--keys", type=int, default=5000, help="distinct texts in the catalogue")
    parser.add_argument("--requests", type=int, default=15000, help="requests replayed")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=1, help="seed of the Zipf draw")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nv-bench-offload-"))
    try:
        report = asyncio.run(measure(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(report, args)
    context = {
        "keys": args.keys,
        "requests": args.requests,
        "clients": args.clients,
        "seed": args.seed,
        "zipf_s": 1.0,
        "voice": VOICE,
        "format": "wav",
        "text": "Item number {i}.",
        "edges": 2,
        "uncommitted": uncommitted(),
    }
    path = write_results("offload", report, context)
    if plot(report, path.with_suffix(".png")):
        print(f"plot: {path.with_suffix('.png')}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
