"""Workers of one node cooperating, so that a key is produced once per node, whatever
`--workers` is.

`nearvoice edge --workers N` runs N processes on one port (SO_REUSEPORT). The kernel
spreads connections over them, so the first requests for a key that goes viral reach every
worker at once, and single-flight (`Node.obtain`, edge.cache.fill) is per process. Across
processes:

* Each key has one owning worker: the first worker index in the key's rendezvous order
  (`owner_of`, the hashing edge.upstream orders upstreams with). Only the owner renders
  the key or fetches it from upstream, and only the owner commits it to the shared disk
  store. A voice that batches (edge.synth.batching) is owned whole: every key of it
  belongs to the voice's owner (`owner_of_voice`), whose batcher then sees all of the
  node's renders of that voice, so batches are never split across processes.
* Every worker listens on a private channel: a unix socket in a directory that only the
  node's user can use (`channel_dir`), answered by an app of its own
  (edge.handlers.channel), never on the public port; every request on it is node-signed
  (edge.nodeauth). A worker that misses a key it does not own fills its own `Fill` from
  the owner's answer on that channel (`Siblings.relay`) with the upstream client
  (edge.upstream: signed requests, a breaker, a broken body failing the fill rather than
  truncating it). The worker's players then read that fill as they would read a local
  render: a prefix of the final bytes, Range into the in-flight object, hang-ups stopping
  nothing, failures aborting. A relayed object is not stored a second time: the owner
  commits it, and until then (and a while after) its fill stays joinable, so a later miss
  here relays again and joins it rather than producing the object again.
* A dead owner (crashed, or restarting under `nearvoice edge`'s supervision) refuses the
  connection at once, and the worker produces the key itself rather than failing. So
  does a relay that fails before its first byte for any other reason (the owner's own
  render or upstream failed): at most one more attempt per worker, and only on failure.
* Purges are broadcast (`Siblings.purge`): every sibling forgets the key (hot tier, fills,
  hot-key counter) and acknowledges before the purge is answered. As in a purge on one
  worker, a forgotten fill is never joined or committed again; the listeners it already
  has finish. The purge stamp
  (edge.cache.hot) still empties the hot tier of a sibling that could not be reached.
* `/admin/hotkeys` and `/admin/stats` gather every worker's figures (`Siblings.gather`),
  and `/admin/prefetch/{id}` asks the worker that runs the job.

Metrics. A sibling's request on the channel is internal: the owner does not count it in
`nearvoice_requests_total`, `nearvoice_response_bytes_total` or `nearvoice_ttfb_seconds`,
since the worker that relays counts the player's request, once: `miss` for the request
that started that worker's fill, `collapsed` for those that joined it. The render or
upstream fetch is counted once, where it happens (`nearvoice_synth_total`,
`nearvoice_upstream_requests_total` with its real reason); a relay is never an upstream
fetch. `nearvoice_worker_relays_total{worker,outcome}` counts fills `relayed` from the
owner (once the owner answered), fills produced here as a `fallback`, and relays `served`
to siblings as the owner.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import hdrs
from prometheus_client import CollectorRegistry, Counter
from yarl import URL

from nearvoice.edge.cache.fill import Fill, FillFailed
from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.config import NodeConfig
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.metrics import Source
from nearvoice.edge.nodeauth import NODE_HEADER, sign_node_request
from nearvoice.edge.producer import receive
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.torch_layout import batched_voices
from nearvoice.edge.token import Grant
from nearvoice.edge.upstream import Upstreams, UpstreamSettings, rendezvous_order

log = logging.getLogger("nearvoice.workers")
WORKER_ENV = "NEARVOICE_WORKER"
"""The worker's index (0..N-1), set by `nearvoice edge --workers N` in each worker."""
SOURCE_HEADER = "X-Nearvoice-Source"
"""On the channel: where the owner's bytes come from (`synth`, `upstream` or `cache`)."""
PURGE_PATH = "/worker/purge"
HOTKEYS_PATH = "/worker/hotkeys"
STATS_PATH = "/worker/stats"
PREFETCH_PATH = "/worker/prefetch"
FIRST_BYTE_TIMEOUT = 120.0
"""Seconds a relay waits for the owner's first byte. The owner answers once its first byte
exists, which may wait on a full render queue or on its own upstream retries; a dead owner
is noticed when it refuses the connection, not by this bound, which only catches a hung
one."""
READ_TIMEOUT = 60.0  # seconds of silence tolerated from the owner mid-body
CALL_TIMEOUT = 5.0  # seconds for a purge, hot-keys or stats call to one sibling
MAX_SOCKET_PATH = 100  # bytes: sun_path holds 108 on Linux, terminating NUL included


class Outcome(StrEnum):
    RELAYED = "relayed"
    FALLBACK = "fallback"
    SERVED = "served"


def owner_of(key: str, count: int) -> int:
    """The index of the worker that produces `key` on a node of `count` workers."""
    return int(rendezvous_order(key, tuple(str(i) for i in range(count)))[0])


def owner_of_voice(voice: str, count: int) -> int:
    """The index of the worker that renders every key of a batching `voice`."""
    return owner_of(f"voice:{voice}", count)


def worker_index() -> int:
    """This process's worker index (0 outside `--workers N`)."""
    raw = os.environ.get(WORKER_ENV, "0")
    return int(raw) if raw.isdigit() else 0


def channel_dir(data_dir: Path) -> Path:
    """Where the workers' sockets live: `<data>/workers`, or, when that path is too long
    for a socket address, a private directory named after the data directory's hash."""
    wanted = Path(data_dir).resolve() / "workers"
    if len(str(wanted / "999.sock").encode()) <= MAX_SOCKET_PATH:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"nearvoice-{digest}"


def socket_path(directory: Path, index: int) -> Path:
    return directory / f"{index}.sock"


def signed_purge_target(body: bytes) -> str:
    """The purge request's target: it names the body's digest, so that the node signature
    over the target covers the keys too."""
    return f"{PURGE_PATH}?sha256={hashlib.sha256(body).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Gathered:
    """Every sibling's answer to one call, and the siblings that gave none."""

    answers: dict[int, Any]
    unreachable: list[int]


class _SiblingClient(Upstreams):
    """The upstream client, pointed at one sibling's unix socket: one base, no retries
    (a refused connection means a dead owner, and the caller produces the key itself)."""

    def __init__(self, index: int, path: Path, keyring: Keyring, settings: UpstreamSettings):
        super().__init__((f"http://worker-{index}",), keyring, settings)
        self.index = index
        self.path = path

    @property
    def base(self) -> str:
        return self.bases[0]

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # One connection per key relayed at once; the default pool of 100 would make
            # the 101st key wait for another one to finish.
            connector=aiohttp.UnixConnector(path=str(self.path), limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            ),
        )


class Siblings:
    """This worker's view of the others: who owns a key, and the channel to each."""

    def __init__(
        self, config: NodeConfig, keyring: Keyring, registry: CollectorRegistry, index: int
    ) -> None:
        self.config = config
        self.keyring = keyring
        self.index = index
        self.count = max(1, config.workers)
        self.directory = channel_dir(Path(config.data_dir))
        settings = UpstreamSettings(
            connect_timeout=config.upstream.connect_timeout,
            first_byte_timeout=FIRST_BYTE_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries=0,
        )
        self._clients = {
            i: _SiblingClient(i, socket_path(self.directory, i), keyring, settings)
            for i in range(self.count)
            if i != index
        }
        relays = Counter(
            "nearvoice_worker_relays",
            "Fills relayed between a node's workers, by worker and outcome.",
            ["worker", "outcome"],
            registry=registry if self.enabled else None,  # a lone worker never relays
        )
        self.outcomes = {outcome: relays.labels(str(index), outcome.value) for outcome in Outcome}
        self.batched: frozenset[str] = batched_voices(config.torch) if self.enabled else frozenset()
        """Voices whose keys all belong to one worker (`owner_of_voice`)."""

    @property
    def enabled(self) -> bool:
        return self.count > 1

    @property
    def socket(self) -> Path:
        """This worker's own channel socket."""
        return socket_path(self.directory, self.index)

    def owner(self, key: str) -> int:
        return owner_of(key, self.count)

    def owner_of_spec(self, spec: Spec) -> int:
        """The worker that produces `spec`: its voice's owner when the voice batches."""
        if spec.voice in self.batched:
            return owner_of_voice(spec.voice, self.count)
        return self.owner(spec.key)

    async def start(self) -> None:
        for client in self._clients.values():
            await client.start()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    # -- relaying -------------------------------------------------------------------------
    async def relay(self, fill: Fill, grant: Grant, target: str) -> bool:
        """Fills `fill` from the key's owner. True when the fill ended here (complete, or
        failed: a broken relay, or the owner's relayed 404/410); False when this worker
        must produce it itself: it owns the key, or the owner failed before sending a byte
        (dead, restarting, or its render failed)."""
        client = self._clients.get(self.owner_of_spec(grant.spec))
        if client is None:
            return False
        try:
            meta = await self._stream(client, fill, grant, target)
        except FillFailed as exc:
            if fill.size:
                # Bytes went out: abort those listeners, never splice another source on.
                log.warning(
                    "worker %d: relay of %s from worker %d broke after %d bytes: %s",
                    self.index,
                    grant.spec.key,
                    client.index,
                    fill.size,
                    exc,
                )
                fill.fail(exc)
                return True
            if exc.status is not None:
                # The owner relayed an upstream's definitive 404/410: asking again here
                # would get the same answer.
                fill.fail(exc)
                return True
            log.warning(
                "worker %d: no answer from worker %d for %s (%s); producing it here",
                self.index,
                client.index,
                grant.spec.key,
                exc,
            )
            self.outcomes[Outcome.FALLBACK].inc()
            return False
        except Exception:
            log.exception("relaying %s failed", grant.spec.key)
            fill.fail(FillFailed("internal_error", "relay failed", retry_after=2))
            return True
        fill.finish(meta)
        return True

    async def _stream(
        self, client: _SiblingClient, fill: Fill, grant: Grant, target: str
    ) -> ObjectMeta:
        async with client.fetch(grant.spec.key, target) as fetched:
            headers = fetched.response.headers
            # The owner's object as it announced it: its ETag (the render revision), its
            # Last-Modified (when its fill began) and, when known, its exact length, so
            # that answers here are the owner's, byte for byte and header for header.
            modified = headers.get(hdrs.LAST_MODIFIED)
            if modified:
                fill.started_at = parsedate_to_datetime(modified).timestamp()
            upstream = headers.get(SOURCE_HEADER) == Source.UPSTREAM.value
            # Counted as the owner answers, before any byte reaches a player here.
            self.outcomes[Outcome.RELAYED].inc()
            await receive(fill, fetched, grant.spec.key, source="relay", from_upstream=upstream)
            digest = fetched.sha256
        body = fill.body()
        computed = await asyncio.get_running_loop().run_in_executor(None, _sha256, body)
        # A stream of an object still in flight carries no digest; a complete one must match.
        if digest is not None and digest != computed:
            raise FillFailed("relay_corrupt", "worker sent bytes that miss their digest")
        assert fill.content_type is not None and fill.etag is not None
        return ObjectMeta(
            key=grant.spec.key,
            content_type=fill.content_type,
            length=len(body),
            etag=fill.etag,
            sha256=computed,
            policy=grant.policy,
            stored_at=fill.started_at,
            ttl=self.config.retention.ttl(grant.policy),
        )

    # -- broadcasts -----------------------------------------------------------------------
    async def purge(self, keys: list[str]) -> Gathered:
        """Tells every sibling to forget `keys`; returns once each acknowledged or failed."""
        body = json.dumps({"keys": keys}).encode()
        target = signed_purge_target(body)
        return await self._each(hdrs.METH_POST, target, body)

    async def gather(self, path: str) -> Gathered:
        """Every sibling's JSON answer to a node-signed GET of `path`."""
        return await self._each(hdrs.METH_GET, path, None)

    async def _each(self, method: str, target: str, body: bytes | None) -> Gathered:
        clients = list(self._clients.values())
        results = await asyncio.gather(
            *(self._call(client, method, target, body) for client in clients)
        )
        answers = {c.index: r for c, r in zip(clients, results, strict=True) if r is not None}
        return Gathered(answers, sorted(c.index for c in clients if c.index not in answers))

    async def _call(
        self, client: _SiblingClient, method: str, target: str, body: bytes | None
    ) -> Any:
        headers = {NODE_HEADER: sign_node_request(self.keyring, method, target, client.base)}
        if body is not None:
            headers[hdrs.CONTENT_TYPE] = "application/json"
        try:
            async with (
                asyncio.timeout(CALL_TIMEOUT),
                client.session.request(
                    method, URL(client.base + target, encoded=True), data=body, headers=headers
                ) as response,
            ):
                if response.status == 404:
                    return None  # not here (a prefetch job another worker runs)
                if response.status != 200:
                    log.warning("worker %d answered %s %s", client.index, response.status, target)
                    return None
                return await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("worker %d unreachable for %s: %s", client.index, target, exc)
            return None


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
