"""A node's state and its request-independent logic: authorizing URLs, looking objects up
through the hot tier and the disk store, rendering misses, storing, and purging."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from nearvoice.edge import activity
from nearvoice.edge.cache.fill import Fill, FillFailed, FillState
from nearvoice.edge.cache.hot import HotEntry, HotTier, PurgeStamp, SharedFile
from nearvoice.edge.cache.hotkeys import SpaceSaving
from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.cache.store import DiskStore, Opened, Outcome
from nearvoice.edge.config import NodeConfig
from nearvoice.edge.errors import BadRequest, RequestError
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.http import aiohttp_private
from nearvoice.edge.http.deliver import DeliveryOptions
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.limits import Limiter
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.nodeauth import NodeVerifier, NonceStore, own_audience
from nearvoice.edge.prefetch import Prefetcher
from nearvoice.edge.producer import Producer
from nearvoice.edge.spec import KEY_RE
from nearvoice.edge.synth.priority import CURRENT, Priority, RenderTicket
from nearvoice.edge.synth.renderer import Renderer
from nearvoice.edge.token import Grant, check_query_shape, check_use, verify_signature
from nearvoice.edge.upstream import Upstreams
from nearvoice.edge.voices import for_config
from nearvoice.edge.workers import Siblings, worker_index

log = logging.getLogger("nearvoice.node")
IO_THREADS = 4  # commits, deletes and bookkeeping: they fsync, so they may wait long
HIT_THREADS = 4  # disk lookups of hits, kept apart so a burst of commits never delays them
SIBLING_PURGE_REREADS = 2  # times a lookup reads again when sibling workers purge meanwhile
GRANT_MEMO_SIZE = 8192  # verified URLs remembered; each is a few hundred bytes
PURGE_CHECK_INTERVAL = 0.05  # seconds between checks for purges made by sibling workers
FILL_GRACE = 5.0  # seconds a completed fill stays joinable after its commit
STOP_GRACE = 10.0  # seconds a stopping node waits for fills under way
MEMORY_RETRY_AFTER = 1  # seconds a miss refused for the fill budget should wait


@dataclass(slots=True)
class Held:
    """An object ready to deliver. Its descriptor, if any, is pinned while it is sent."""

    meta: ObjectMeta
    body: bytes | None
    file: SharedFile | None
    stale: bool = False
    """Past its TTL: served only when the fresh copy cannot be had (stale-if-error)."""

    def __enter__(self) -> SharedFile | None:
        return self.file.acquire() if self.file else None

    def __exit__(self, *_: object) -> None:
        if self.file:
            self.file.release()

    def close(self) -> None:
        """Drops a stale object's own descriptor (hot-tier ones belong to the tier)."""
        if self.stale and self.file:
            self.file.release()


class Node:
    def __init__(self, config: NodeConfig, keyring: Keyring, renderer: Renderer | None) -> None:
        self.config = config
        self.keyring = keyring
        self.metrics = Metrics()
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.store = DiskStore(data / "cache", config.store)
        self.hot = HotTier(config.hot)
        self.purges = PurgeStamp(data / "purge.stamp")
        self.hotkeys = SpaceSaving(config.hotkeys_capacity)
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io")
        self.hit_io = ThreadPoolExecutor(HIT_THREADS, thread_name_prefix="hit")
        self._reading: dict[str, list[_DiskRead]] = {}
        """Lookups waiting on the disk, by key: a purge marks them so they cannot undo it."""
        self._purging: Counter[str] = Counter()
        """Keys whose purge has not finished deleting them from disk yet."""
        self.ready = False
        self._recent: set[str] = set()
        self.voices = for_config(config)
        """Every voice this node accepts: the catalog's and configured external ones."""
        self._grants: OrderedDict[str, Grant] = OrderedDict()
        self.delivery = DeliveryOptions(
            max_ranges=config.http.max_ranges,
            use_sendfile=config.http.sendfile,
            # The access log (edge.http.logs) records direct answers too; aiohttp's
            # internals they rely on are checked once (edge.http.aiohttp_private).
            direct=aiohttp_private.compatible(),
        )
        self._purge_checked = 0.0
        self._fills: dict[str, Fill] = {}
        self._tickets: dict[str, RenderTicket] = {}
        """Render tickets of fills started by prefetches, for players joining them."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.upstreams = Upstreams(config.upstreams, keyring, config.upstream)
        self.producer = Producer(
            config, renderer, self.upstreams, self.store, self.hot, self.metrics, self.io
        )
        self.prefetcher = Prefetcher(self)
        scheme = "https" if config.tls.enabled else "http"
        self.node_auth = NodeVerifier(
            keyring,
            config.nodeauth.audience or own_audience(scheme, config.host, config.port),
            NonceStore(data / "nodeauth-nonces.sqlite" if config.workers > 1 else None),
            config.nodeauth.legacy_until,
        )
        """Checks X-Nearvoice-Node from the tiers below (edge.nodeauth)."""
        self.limiter = Limiter(
            config.limits.max_buckets,
            on_refusal=lambda scope: self.metrics.rate_limited.labels(scope).inc(),
            # One set of buckets for all of the node's workers (edge.limits.SharedBuckets).
            shared=data / "limits.buckets" if config.workers > 1 else None,
        )
        """The node's one rate limiter, shared by its doors (edge.limits)."""
        self.siblings = Siblings(config, keyring, self.metrics.registry, worker_index())
        """The node's other workers (edge.workers): who produces a key, and the channel."""
        if config.workers > 1:
            # A first piece spins only while the node's workers render nothing else.
            activity.RENDERS.share(data / "activity", self.siblings.index, config.workers)

    @property
    def renderer(self) -> Renderer | None:
        return self.producer.renderer

    @renderer.setter
    def renderer(self, renderer: Renderer | None) -> None:
        self.producer.renderer = renderer

    async def start(self) -> None:
        await self.upstreams.start()
        await self.siblings.start()

    async def stop(self) -> None:
        """Lets fills under way finish (their listeners are mid-stream), then closes."""
        await self.prefetcher.stop()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
        for task in list(self._tasks):
            task.cancel()
        await self.upstreams.close()
        await self.siblings.close()

    def close(self) -> None:
        self.hot.clear()
        self.hit_io.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self.store.close()
        self.node_auth.nonces.close()
        if self.limiter.shared is not None:
            self.limiter.shared.close()
        if self.renderer is not None:
            self.renderer.close()

    # -- authorization --------------------------------------------------------------------
    def authorize(
        self,
        target: str,
        key: str,
        ext: str,
        query: Callable[[], tuple[Mapping[str, str], bool]],
        client_ip: str | None,
        node_signature: str | None = None,
        *,
        trusted: bool = False,
        method: str = "GET",
    ) -> Grant:
        """Checks everything about a speech URL before any cache or engine sees it.

        Everything but expiry and the client address depends on the URL alone, so a URL
        that passed once is remembered by its exact request target and only re-checked for
        those two; a memo hit skips parsing the query, the HMAC, the AES-GCM open and the
        spec hash. `query` returns the parsed query and whether a name was repeated.

        A request signed by a sibling node (`node_signature`, edge.nodeauth) skips the
        client-address check: the edge that forwarded it made that check against the
        player's own address.
        """
        try:
            grant = self._grants.get(target)
            if grant is None:
                fields, repeated = query()
                grant = self._verify_url(key, ext, fields, repeated)
                self._grants[target] = grant
                if len(self._grants) > GRANT_MEMO_SIZE:
                    self._grants.popitem(last=False)  # the least recently used
            else:
                self._grants.move_to_end(target)
            if trusted or (
                node_signature is not None and self.node_auth.verify(node_signature, method, target)
            ):
                client_ip = None
                grant_to_check = replace(grant, network=None)
            else:
                grant_to_check = grant
            check_use(
                grant_to_check,
                client_ip=client_ip,
                now=time.time(),
                skew=self.config.http.clock_skew,
            )
            return grant
        except RequestError as exc:
            self.metrics.token_rejections.labels(exc.code).inc()
            raise

    def remembered(self, target: str, client_ip: str | None, now: float) -> Grant | None:
        """The grant of a URL already verified under exactly this request target, if it
        still passes the per-request checks (expiry, client address); None otherwise,
        with nothing counted: the caller then takes the full path through `authorize`,
        which checks and counts the refusal itself. For the fast path only, which never
        sees node-signed requests."""
        grant = self._grants.get(target)
        if grant is None:
            return None
        try:
            check_use(grant, client_ip=client_ip, now=now, skew=self.config.http.clock_skew)
        except RequestError:
            return None
        self._grants.move_to_end(target)
        return grant

    def _verify_url(self, key: str, ext: str, query: Mapping[str, str], repeated: bool) -> Grant:
        if not KEY_RE.fullmatch(key):
            raise BadRequest("malformed_key", "key must be 64 lowercase hex characters")
        fmt = AudioFormat.parse(ext)
        if fmt is None:
            known = [f.value for f in AudioFormat]
            raise BadRequest("unsupported_format", f"unknown format {ext!r}", known=known)
        check_query_shape(query, repeated)
        grant = verify_signature(self.keyring, f"/v1/speech/{key}.{ext}", key, query)
        spec = grant.spec
        if spec.format is not fmt:
            raise BadRequest("format_mismatch", "the path's extension is not the spec's format")
        if len(spec.text) > self.config.synth.max_text_chars:
            limit = self.config.synth.max_text_chars
            raise BadRequest("text_too_long", f"text is longer than {limit} characters")
        if spec.voice not in self.voices:
            raise BadRequest(
                "unknown_voice", f"unknown voice {spec.voice!r}", known=sorted(self.voices)
            )
        return grant

    # -- lookups --------------------------------------------------------------------------
    async def lookup(self, key: str, *, hit: bool = True) -> Held | None:
        """The object for `key` from the hot tier or the disk, or None. An expired one
        still on disk comes back marked stale, for stale-if-error; `hit=False` looks
        without counting a hit (prefetch)."""
        now = time.time()
        entry = self.hot_entry(key, now)
        if entry is None:
            opened = await self._read_disk(key)
            if opened.outcome is Outcome.CORRUPT:
                log.warning("dropped corrupt cache entry %s", key)
            if opened.outcome is not Outcome.HIT or opened.meta is None:
                return None
            if not opened.meta.fresh(now):
                file = SharedFile(opened.fd) if opened.fd >= 0 else None
                return Held(opened.meta, opened.body, file, stale=True)
            entry = self.hot.put(opened.meta, body=opened.body, fd=opened.fd, now=now)
        if hit:
            self.count_hit(key)
        return Held(entry.meta, entry.body, entry.file)

    async def _read_disk(self, key: str) -> Opened:
        """`store.open` in the hit pool. A purge of `key` by this worker that lands while
        it waits makes it a miss: what it read may be the purged object, and putting that
        in the hot tier would undo the purge. With several workers, any purge by a sibling
        meanwhile (the shared stamp moved; it moves after the delete) means reading again."""
        shared = self.config.workers > 1
        for _ in range(SIBLING_PURGE_REREADS + 1):
            read = _DiskRead(self.purges.read() if shared else 0)
            self._reading.setdefault(key, []).append(read)
            loop = asyncio.get_running_loop()
            try:
                opened = await loop.run_in_executor(
                    self.hit_io, self.store.open, key, self.config.hot.max_object_bytes
                )
            finally:
                waiting = self._reading[key]
                waiting.remove(read)
                if not waiting:
                    del self._reading[key]
            moved = shared and self.purges.read() != read.stamp
            purged = read.purged or key in self._purging
            if opened.outcome is not Outcome.HIT or not (purged or moved):
                return opened
            if opened.fd >= 0:
                os.close(opened.fd)
            if purged:
                break
        return Opened(Outcome.MISS)

    def hot_entry(self, key: str, now: float) -> HotEntry | None:
        """The hot tier's fresh entry for `key`, without counting a hit; the synchronous
        first step of `lookup`, shared with the fast path (edge.http.fastpath)."""
        if self.config.workers > 1 and now - self._purge_checked > PURGE_CHECK_INTERVAL:
            # A sibling worker's purge must also empty this worker's hot tier.
            self._purge_checked = now
            if self.purges.changed():
                self.hot.clear()
        return self.hot.get(key, now)

    def count_hit(self, key: str) -> None:
        """Records a hit on `key` for the recency write-back and the hot-keys report."""
        self._recent.add(key)
        self.hotkeys.add(key)

    # -- misses ---------------------------------------------------------------------------
    def running_fill(self, grant: Grant) -> Fill | None:
        """The fill producing `grant`'s object right now, if any."""
        fill = self._fills.get(_fill_key(grant))
        return fill if fill is not None and fill.is_running() else None

    def joinable(self, grant: Grant) -> bool:
        """Whether `obtain` would join a fill (running, or lingering after its commit)
        rather than start one: what a limiter's hit or miss scope is decided by."""
        return _fill_key(grant) in self._fills

    def obtain(
        self, grant: Grant, target: str, *, priority: Priority = Priority.PLAYER
    ) -> tuple[Fill, bool]:
        """The fill for `grant`'s object, started if none is under way; True if joined.
        A render it queues waits its turn by `priority`; a player joining a prefetch's
        fill moves its render up to a player's.

        Synchronous on purpose: between the check and the insert nothing else runs, so
        concurrent misses for one key can never start two producers.
        """
        name = _fill_key(grant)
        fill = self._fills.get(name)
        if fill is not None:
            fill.readers += 1
            ticket = self._tickets.get(name)
            if ticket is not None and priority is Priority.PLAYER:
                ticket.hurry()
            return fill, True
        fill = Fill(grant.spec.key)
        fill.readers = 1
        if not self._fills_within_budget():
            log.warning("fills hold more than [memory] fill_budget; refusing a miss")
            fill.fail(
                FillFailed(
                    "memory_budget",
                    "this node holds as many objects in production as its memory allows",
                    retry_after=MEMORY_RETRY_AFTER,
                )
            )
            return fill, False
        self._fills[name] = fill
        ticket = RenderTicket(priority)
        if priority is not Priority.PLAYER:
            self._tickets[name] = ticket
        context = contextvars.copy_context()
        context.run(CURRENT.set, ticket)  # the fill's renders queue with this ticket
        task = asyncio.create_task(
            self._run(fill, name, grant, target), name=f"fill-{name}", context=context
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill, False

    def _fills_within_budget(self) -> bool:
        """Whether the bodies held by fills are under `[memory] fill_budget`, once
        completed fills (lingering only to be joined) have been let go if need be."""
        budget = self.config.memory.fill_budget
        held = sum(fill.size for fill in self._fills.values())
        if held < budget:
            return True
        for name, fill in list(self._fills.items()):
            if not fill.is_running():
                del self._fills[name]  # a later request finds it on disk instead
                held -= fill.size
                if held < budget:
                    return True
        return False

    async def _run(self, fill: Fill, name: str, grant: Grant, target: str) -> None:
        try:
            # The key's owning worker produces it; the others stream it from there.
            if not await self.siblings.relay(fill, grant, target):
                await self.producer.produce(fill, grant, target)
        finally:
            if self._tickets.get(name) is CURRENT.get():
                del self._tickets[name]
        if fill.is_running():  # produce() always ends the fill; be safe if that ever changes
            fill.fail(FillFailed("internal_error", "producer ended without a result"))
        if fill.state is FillState.DONE and fill.stored:
            # Linger, so requests that missed the cache just before the commit join this
            # fill instead of producing the object again. (Drafts and objects the store
            # refused have no such window: the next request produces them afresh.)
            asyncio.get_running_loop().call_later(FILL_GRACE, self._forget, name, fill)
        else:
            self._forget(name, fill)

    def _forget(self, name: str, fill: Fill) -> None:
        if self._fills.get(name) is fill:
            del self._fills[name]

    # -- admin ----------------------------------------------------------------------------
    async def purge(self, key: str) -> bool:
        """Removes `key` from every tier of this node, the origin's persistent store
        included; True if any of them held it. Siblings are told by the caller
        (`Siblings.purge`); the stamp bumped here covers those that cannot be."""
        # The URL memo stays: a purge changes what is cached, not which URLs are valid.
        self._purging[key] += 1
        try:
            return await self._purge(key)
        finally:
            self._purging[key] -= 1
            if not self._purging[key]:
                del self._purging[key]

    async def _purge(self, key: str) -> bool:
        forgotten = self.forget(key)
        loop = asyncio.get_running_loop()
        removed = await loop.run_in_executor(self.io, self.store.delete, key)
        persistent = self.producer.persistent
        if persistent is not None:
            removed = await loop.run_in_executor(self.io, persistent.delete, key) or removed
        for fill in forgotten:  # a write it raced with lands and is undone first
            await fill.settled()
        await loop.run_in_executor(self.io, self.purges.bump)
        return removed

    def forget(self, key: str) -> list[Fill]:
        """Drops what this worker holds of `key` in memory: its hot entry, its hot-key
        counter, lookups of it waiting on the disk (they must not refill the hot tier) and
        its fills, which must neither commit nor be joined after this (their bytes are
        exactly what is being purged). Fills under way keep streaming to the listeners
        they have. Called by `purge`, and by a sibling worker's purge (edge.workers).
        Returns the fills it marked, whose writes the purge waits for (`Fill.settled`)."""
        self.hot.drop(key)
        for read in self._reading.get(key, ()):
            read.purged = True
        self.hotkeys.discard(key)
        marked: list[Fill] = []
        for name in (key, f"draft:{key}"):
            fill = self._fills.pop(name, None)
            if fill is not None:
                fill.purged = True
                marked.append(fill)
        return marked

    async def flush_recency(self) -> None:
        keys, self._recent = self._recent, set()
        if keys:
            await asyncio.get_running_loop().run_in_executor(self.io, self.store.refresh, keys)

    async def refresh_gauges(self) -> tuple[int, int]:
        """Reads the disk store's size and object count, and this process's hot tier's
        memory, into the gauges; returns the store's two."""
        self.metrics.hot_bytes.set(self.hot.memory)
        loop = asyncio.get_running_loop()
        volume, count = await loop.run_in_executor(self.io, _volume_and_count, self.store)
        self.metrics.cache_bytes.set(volume)
        self.metrics.cache_objects.set(count)
        return volume, count


class _DiskRead:
    """A lookup waiting on the disk."""

    __slots__ = ("purged", "stamp")

    def __init__(self, stamp: int) -> None:
        self.purged = False
        """A purge of its key landed meanwhile."""
        self.stamp = stamp
        """The shared purge stamp when it started (several workers only)."""


def _volume_and_count(store: DiskStore) -> tuple[int, int]:
    return store.volume(), store.count()


def _fill_key(grant: Grant) -> str:
    # A draft is never stored, so it must not share a producer with a request that
    # would store the object.
    return grant.spec.key if grant.policy.stored else f"draft:{grant.spec.key}"
