"""Soak: a real three-tier stack under mixed load for `--minutes`, with its shield killed
and restarted midway.

Three `nearvoice` processes on loopback, as `nearvoice up` runs them (origin with a
filesystem object store, shield, edge), each with its own data directory in a temporary
directory removed at the end; secrets generated for the run. `--clients` aiohttp clients
loop over a weighted mix of operations at the edge:

* `range_hit`: a Range request (`bytes=a-b`) for an object the run already fetched whole;
  206 with exactly b-a+1 bytes;
* `cold_miss`: a new text, voice `heart` (rendered at the edge) or `joe` (rendered only at
  the origin, so the miss crosses every tier);
* `collapse`: four requests at once for one new text;
* `purge`: `POST /admin/purge` with `cascade` of a fetched object, then a GET of it
  (`after_purge`), which must be produced again;
* `prefetch`: `POST /admin/prefetch` of two new texts, waits for the job, then GETs one
  (`prefetched`).

At `--kill-at` (a fraction of the run) the shield gets SIGKILL; `--outage` seconds later it
is started again on the same port and data directory. Upstream failures (502/503/504 with
an upstream code: `upstream_*`, `circuit_open`, `memory_budget`) from the kill until the
shield is back plus the breaker's `open_seconds` and the miss `deadline` are expected;
every other failure (any other status, a refused connection at the edge, a body shorter
than its headers promised) is unexpected. The target is 0 unexpected.

Reported (bench-results/soak/<UTC>.json, and .png beside it when matplotlib is installed):

* errors: every non-2xx and client failure by operation, status and code, split into
  expected and unexpected;
* memory: each process's RSS sampled every `--sample` seconds, plotted over time, and its
  growth from the end of the warm-up. The nodes' hot tiers get `--hot-budget` bytes (32 MiB,
  not the default 256 MiB). Memory a budget accounts for is not growth; what the soak looks
  for is memory no budget accounts for, so the target applies to RSS less the hot tier's
  bodies (`nearvoice_hot_bytes`, scraped with each sample): a shield or an origin sees only
  misses and may still be filling its hot tier long after the warm-up. Raw RSS growth is
  reported beside it. Growth runs
  from the end of the warm-up (`--warmup`, a fraction of the run; for the restarted
  shield, from as long after its restart) to the end of the run, as the mean of the last
  tenth of the samples against the mean of the first tenth after warm-up (target < 5 %);
* first byte: p50/p99 seen by the clients per operation, and p99 per result from the edge's
  own `nearvoice_ttfb_seconds` histogram (interpolated within buckets, as Prometheus's
  histogram_quantile does);
* bytes: body bytes the clients received at the edge against the edge's
  `nearvoice_response_bytes_total` over the same span (every byte accounted for: the
  difference should be 0; a transfer that broke off counts on both sides with the bytes
  that got through, and as a failure: expected during the outage, unexpected otherwise).

    nearvoice bench soak                 # 10 minutes
    nearvoice bench soak --minutes 1     # a quick check that everything runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nearvoice.bench.common import child_env, free_port, write_results
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import KEYS_ENV, Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.stack import stop_processes
from nearvoice.edge.token import sign_url
from nearvoice.edge.upstream import UpstreamSettings
from nearvoice.edge.voices import resolve

READY_TIMEOUT = 180.0  # seconds for the nodes to load and warm their engines
REQUEST_TIMEOUT = 60.0  # seconds for one request, body included
OPERATIONS = {  # operation -> weight in the mix
    "range_hit": 60,
    "cold_miss": 18,
    "collapse": 6,
    "purge": 4,
    "prefetch": 3,
}
COLLAPSE_FANOUT = 4
EXPECTED_CODES = {"circuit_open", "memory_budget", "no_upstream", "overloaded"}
GROWTH_TARGET = 0.05
HOT_BUDGET = 32 * 1024**2  # bytes: small enough to fill during the warm-up


# -- processes ------------------------------------------------------------------------------


@dataclass
class Tier:
    role: str
    port: int
    data_dir: Path
    extra: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "nearvoice.edge.cli", self.role, "--port", str(self.port),
            "--data-dir", str(self.data_dir), *self.extra,
        ]  # fmt: skip
        with (self.data_dir / "node.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=child_env(self.env), stdout=log, stderr=log)
        self.started_at = time.monotonic()

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.data_dir / "node.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n{tail}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.base}/readyz", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.role} was not ready within {READY_TIMEOUT:.0f} s")


@contextlib.contextmanager
def three_tiers(work: Path, env: dict[str, str], hot_budget: int) -> Iterator[dict[str, Tier]]:
    """origin <- shield <- edge, as real processes; always stopped, edge first."""
    origin, shield, edge = (free_port() for _ in range(3))
    hot = f"[hot]\nmemory_budget = {hot_budget}\n"
    configs = {role: work / f"{role}.toml" for role in ("origin", "shield", "edge")}
    configs["origin"].write_text(
        f'role = "origin"\n{hot}[origin]\npublic_base = "http://127.0.0.1:{edge}"\n'
        f'store = "{(work / "origin" / "objects").resolve()}"\n'
    )
    for role in ("shield", "edge"):
        configs[role].write_text(f'role = "{role}"\n{hot}')

    def tier(role: str, port: int, upstream: int | None) -> Tier:
        extra = ["--config", str(configs[role])]
        if upstream is not None:
            extra += ["--upstream", f"http://127.0.0.1:{upstream}"]
        return Tier(role, port, work / role, extra, env)

    tiers = {
        "origin": tier("origin", origin, None),
        "shield": tier("shield", shield, origin),
        "edge": tier("edge", edge, shield),
    }
    try:
        for tier in tiers.values():
            tier.start()
        deadline = time.monotonic() + READY_TIMEOUT
        for tier in tiers.values():
            tier.wait_ready(deadline)
        yield tiers
    finally:
        procs = [t.proc for t in reversed(tiers.values()) if t.proc is not None]
        stop_processes(procs)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def hot_mb(base: str) -> float | None:
    """The node's `nearvoice_hot_bytes` in MB (what its hot tier holds by its budget)."""
    try:
        value = scrape(base).get(("nearvoice_hot_bytes", ()))
    except (OSError, ValueError):
        return None
    return None if value is None else value / 1024**2


class RssSampler:
    """Samples every tier's resident memory in a thread: (seconds into the run, MB), and
    the part of it that is not the hot tier's budgeted bodies (`unbudgeted`)."""

    def __init__(self, tiers: dict[str, Tier], interval: float, t0: float) -> None:
        self.samples: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.unbudgeted: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._tiers, self._interval, self._t0 = tiers, interval, t0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self._t0
            for role, tier in self._tiers.items():
                proc = tier.proc
                if proc is not None and proc.poll() is None:
                    value = rss_mb(proc.pid)
                    if value is not None:
                        self.samples[role].append((now, value))
                        hot = hot_mb(tier.base)
                        if hot is not None:
                            self.unbudgeted[role].append((now, value - hot))
            self._stop.wait(self._interval)


# -- the load -------------------------------------------------------------------------------


@dataclass
class Fetched:
    url: str
    length: int


@dataclass
class Load:
    edge: str
    keyring: Keyring
    admin: dict[str, str]
    rng: random.Random
    outage: list[float]
    """[start, end) in seconds into the run when upstream failures are expected."""
    t0: float
    fetched: dict[str, Fetched] = field(default_factory=dict)
    counter: int = 0
    first_byte: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: Counter[tuple[str, int, str, bool]] = field(default_factory=Counter)
    """(operation, status, code, expected) -> count, for failures."""
    ok: Counter[str] = field(default_factory=Counter)
    body_bytes: int = 0
    broken: int = 0

    def url(self, text: str, voice: str) -> tuple[str, str]:
        v = resolve(voice)
        spec = Spec.create(text=text, voice=v.name, format=AudioFormat.WAV, model=v.model_id)
        return spec.key, sign_url(self.keyring, self.edge, spec, policy=Policy.HOT, ttl=86400)

    def new_text(self) -> str:
        self.counter += 1
        return f"Soak line number {self.counter}, spoken once."

    def expected(self, status: int, code: str) -> bool:
        now = time.monotonic() - self.t0
        during = self.outage[0] <= now < self.outage[1]
        if code == "broken_transfer":  # a stream from the killed upstream, cut short
            return during
        upstream = code.startswith("upstream_") or code in EXPECTED_CODES
        return during and status in (502, 503, 504) and upstream

    async def get(
        self, session: aiohttp.ClientSession, op: str, url: str, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """One GET; a failure is recorded with its status (-1: the body broke off or was
        not what the headers promised) and code, and answers (status, b"")."""
        started = time.perf_counter()
        status, code = 0, "connection"
        chunks: list[bytes] = []
        try:
            async with session.get(url, headers=headers) as resp:
                status = resp.status
                async for chunk in resp.content.iter_any():
                    if not chunks:
                        self.first_byte[op].append(time.perf_counter() - started)
                    chunks.append(chunk)
                    if status < 300:  # the edge counts audio bodies, not JSON errors
                        self.body_bytes += len(chunk)
                body = b"".join(chunks)
                declared = resp.content_length
                if declared is not None and len(body) != declared:
                    status, code = -1, "short_body"
                elif status == 200 and not body:
                    status, code = -1, "empty_body"  # audio is never empty
                elif status >= 400:
                    with contextlib.suppress(ValueError):
                        code = json.loads(body).get("error", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers came, then the body broke off: the edge ended a stream it could
            # not finish (its upstream died mid-object) rather than send a short one.
            status, code = (-1, "broken_transfer") if status else (0, type(exc).__name__)
        if 200 <= status < 300:
            self.ok[op] += 1
            return status, b"".join(chunks)
        self.broken += status == -1
        self.outcomes[(op, status, code, self.expected(status, code))] += 1
        return status, b""

    async def step(self, session: aiohttp.ClientSession) -> None:
        ops, weights = zip(*OPERATIONS.items(), strict=True)
        op = self.rng.choices(ops, weights)[0]
        if op == "range_hit" and self.fetched:
            item = self.fetched[self.rng.choice(list(self.fetched))]
            start = self.rng.randrange(item.length)
            end = self.rng.randrange(start, item.length)
            status, body = await self.get(session, op, item.url, {"Range": f"bytes={start}-{end}"})
            if status == 206 and len(body) != end - start + 1:
                self.outcomes[(op, status, "wrong_range_length", False)] += 1
        elif op in ("range_hit", "cold_miss"):
            key, url = self.url(self.new_text(), self.rng.choice(("heart", "joe")))
            status, body = await self.get(session, "cold_miss", url, {})
            if status == 200:
                self.fetched[key] = Fetched(url, len(body))
        elif op == "collapse":
            key, url = self.url(self.new_text(), self.rng.choice(("heart", "joe")))
            answers = await asyncio.gather(
                *(self.get(session, op, url, {}) for _ in range(COLLAPSE_FANOUT))
            )
            if answers[0][0] == 200:
                self.fetched[key] = Fetched(url, len(answers[0][1]))
        elif op == "purge" and self.fetched:
            key = self.rng.choice(list(self.fetched))
            item = self.fetched.pop(key)
            await self.admin_post(session, op, "/admin/purge", {"keys": [key], "cascade": True})
            status, body = await self.get(session, "after_purge", item.url, {})
            if status == 200:
                self.fetched[key] = Fetched(item.url, len(body))
        elif op == "prefetch":
            texts = [self.new_text(), self.new_text()]
            specs = [{"text": t, "voice": "heart"} for t in texts]
            job = await self.admin_post(session, op, "/admin/prefetch", {"specs": specs})
            if job is not None:
                await self.wait_job(session, job["progress"])
                key, url = self.url(texts[0], "heart")
                status, body = await self.get(session, "prefetched", url, {})
                if status == 200:
                    self.fetched[key] = Fetched(url, len(body))

    async def admin_post(
        self, session: aiohttp.ClientSession, op: str, path: str, payload: dict[str, Any]
    ) -> Any:
        try:
            async with session.post(self.edge + path, json=payload, headers=self.admin) as resp:
                answer = await resp.json()
                if resp.status < 300:
                    self.ok[op] += 1
                    return answer
                self.outcomes[(op, resp.status, str(answer.get("error")), False)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes[(op, 0, f"client:{type(exc).__name__}", False)] += 1
        return None

    async def wait_job(self, session: aiohttp.ClientSession, progress: str) -> None:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            while True:
                async with session.get(self.edge + progress, headers=self.admin) as resp:
                    if (await resp.json())["state"] != "running":
                        return
                await asyncio.sleep(0.2)


async def run_load(load: Load, clients: int, until: float) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            while time.monotonic() < until:
                await load.step(session)

        await asyncio.gather(*(client() for _ in range(clients)))


async def outage(tiers: dict[str, Tier], at: float, seconds: float, load: Load) -> None:
    """Kills the shield at `at` (monotonic), starts it again `seconds` later."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    shield = tiers["shield"]
    assert shield.proc is not None
    upstream = UpstreamSettings()
    load.outage[0] = time.monotonic() - load.t0
    shield.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(shield.proc.wait)
    await asyncio.sleep(seconds)
    shield.start()
    await asyncio.to_thread(shield.wait_ready, time.monotonic() + READY_TIMEOUT)
    back = time.monotonic() - load.t0
    load.outage[1] = back + upstream.open_seconds + upstream.deadline + 2.0


# -- reporting ------------------------------------------------------------------------------


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("nearvoice_"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus's interpolation over cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def ttfb_by_result(after: dict[Any, float], before: dict[Any, float]) -> dict[str, float | None]:
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (name, labels), value in after.items():
        if name != "nearvoice_ttfb_seconds_bucket":
            continue
        label = dict(labels)
        bound = float(label["le"])
        buckets[label["result"]].append((bound, value - before.get((name, labels), 0.0)))
    return {
        result: None if (p := histogram_quantile(b, 0.99)) is None else round(p * 1000, 2)
        for result, b in sorted(buckets.items())
    }


def growth(samples: list[tuple[float, float]], since: float) -> float | None:
    """Mean RSS of the last tenth of the samples against the first tenth after `since`."""
    after = [mb for t, mb in samples if t >= since]
    if len(after) < 10:
        return None
    tenth = max(1, len(after) // 10)
    start = sum(after[:tenth]) / tenth
    end = sum(after[-tenth:]) / tenth
    return end / start - 1


def plot(samples: dict[str, list[tuple[float, float]]], marks: list[float], path: Path) -> bool:
    """RSS over time per process, if matplotlib is importable (the export extra has it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for role, points in sorted(samples.items()):
        ax.plot([t for t, _ in points], [mb for _, mb in points], ".", markersize=2, label=role)
    for x, label in zip(marks, ("warm-up ends", "shield killed", "shield back"), strict=False):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (x, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("nearvoice soak: resident memory per process")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nearvoice bench soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the run")
    parser.add_argument(
        "--outage", type=float, default=None, help="seconds (default 5%% of the run)"
    )
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument(
        "--hot-budget", type=int, default=HOT_BUDGET, help="[hot] memory_budget, bytes"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    outage_seconds = args.outage if args.outage is not None else max(3.0, 0.05 * seconds)

    keys = generate_pair()
    env = {
        **os.environ,
        KEYS_ENV: keys,
        ADMIN_TOKEN_ENV: secrets.token_urlsafe(24),
        "NEARVOICE_LOG_LEVEL": "WARNING",
    }
    with (
        tempfile.TemporaryDirectory(prefix="nv-soak-") as tmp,
        three_tiers(Path(tmp), env, args.hot_budget) as tiers,
    ):
        t0 = time.monotonic()
        load = Load(
            edge=tiers["edge"].base,
            keyring=Keyring.parse(keys),
            admin={"Authorization": f"Bearer {env[ADMIN_TOKEN_ENV]}"},
            rng=random.Random(args.seed),
            outage=[float("inf"), float("inf")],
            t0=t0,
        )
        before = scrape(load.edge)
        with RssSampler(tiers, args.sample, t0) as sampler:

            async def run() -> None:
                kill = asyncio.create_task(
                    outage(tiers, t0 + args.kill_at * seconds, outage_seconds, load)
                )
                await run_load(load, args.clients, t0 + seconds)
                await kill

            asyncio.run(run())
        after = scrape(load.edge)
        shield_back = tiers["shield"].started_at - t0

    warm = args.warmup * seconds
    growth_since = {role: warm for role in sampler.samples}
    growth_since["shield"] = max(warm, shield_back + warm)
    memory = {
        role: {
            "first_mb": round(points[0][1], 1),
            "last_mb": round(points[-1][1], 1),
            "peak_mb": round(max(mb for _, mb in points), 1),
            "growth_after_warmup": None
            if (g := growth(points, growth_since[role])) is None
            else round(g, 4),
            "unbudgeted_growth_after_warmup": None
            if (u := growth(sampler.unbudgeted[role], growth_since[role])) is None
            else round(u, 4),
        }
        for role, points in sorted(sampler.samples.items())
    }
    counted = sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == "nearvoice_response_bytes_total"
    )
    unexpected = sum(n for (_, _, _, expected), n in load.outcomes.items() if not expected)
    report: dict[str, Any] = {
        "outage": {
            "killed_at_s": round(load.outage[0], 1),
            "back_at_s": round(shield_back, 1),
        },
        "requests_ok": dict(load.ok),
        "failures": [
            {"operation": op, "status": status, "code": code, "expected": expected, "count": n}
            for (op, status, code, expected), n in sorted(load.outcomes.items())
        ],
        "unexpected_errors": unexpected,
        "memory": memory,
        "first_byte_ms_client": {
            op: {
                "count": len(v),
                "p50": round((percentile(v, 0.5) or 0) * 1000, 2),
                "p99": round((percentile(v, 0.99) or 0) * 1000, 2),
            }
            for op, v in sorted(load.first_byte.items())
        },
        "first_byte_p99_ms_by_result": ttfb_by_result(after, before),
        "bytes": {
            "received_by_clients": load.body_bytes,
            "counted_by_edge": int(counted),
            "difference": load.body_bytes - int(counted),
            "broken_transfers": load.broken,
        },
    }
    context = {
        "minutes": args.minutes,
        "clients": args.clients,
        "warmup_fraction": args.warmup,
        "kill_at_fraction": args.kill_at,
        "outage_seconds": outage_seconds,
        "hot_budget_bytes": args.hot_budget,
        "seed": args.seed,
        "growth_target": GROWTH_TARGET,
    }
    path = write_results("soak", report, context)
    png = path.with_suffix(".png")
    drawn = plot(sampler.samples, [warm, load.outage[0], shield_back], png)
    print(json.dumps(report, indent=2))
    print(f"results: {path}" + (f" and {png}" if drawn else " (no chart: matplotlib absent)"))
    grew = [
        r for r, m in memory.items() if (m["unbudgeted_growth_after_warmup"] or 0) > GROWTH_TARGET
    ]
    print(
        f"unexpected errors: {unexpected}; growth over {GROWTH_TARGET:.0%}: {grew or 'none'}; "
        f"bytes unaccounted: {report['bytes']['difference']}"
    )
    return 0 if unexpected == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
