"""Producing a missing object into its `Fill`: render here, or fetch from upstream.

Admission decides the source. The node renders locally when it has the spec's exact model
and its render queue promises a start sooner than an upstream's first byte; otherwise it
fetches, counting the reason in `nearvoice_upstream_requests_total{reason}`:

* `no_engine`: the voice (or this exact model) is not rendered on this node;
* `capability`: the local engine does not honour every control in the spec (a duration,
  an emotion, a reference voice, a hint symbol it cannot say; edge.synth.capability), or
  the voice is not rendered here and the spec asks for a control that no engine of this
  node honours, so no voice here could have rendered it either: a cloned line (`ref`)
  at an edge or a shield, which never hold a clip (docs/contracts.md#reference-voices);
* `overload`: the engine's render queue is full;
* `queue`: the estimated queue wait exceeds the upstream's estimated first byte;
* `engine_error`: the local render failed before producing a byte.

When the object is complete it is verified and committed like any other (unless its
policy is `draft`); a store failure is logged and counted, and the listeners still get
every byte. A failure leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Protocol

from aiohttp import hdrs

from nearvoice.edge.cache.fill import Fill, FillFailed
from nearvoice.edge.cache.hot import HotTier
from nearvoice.edge.cache.meta import ObjectMeta, etag_for, revision_of
from nearvoice.edge.cache.store import DiskStore
from nearvoice.edge.config import NodeConfig
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.synth.renderer import Renderer, RenderError, RenderRefused
from nearvoice.edge.token import Grant
from nearvoice.edge.upstream import Fetched, Upstreams

log = logging.getLogger("nearvoice.producer")
RENDER_RETRY_AFTER = 2  # seconds a client should wait after a failed render


class PersistentStore(Protocol):
    """Where an origin keeps every render for good (origin.store implements it)."""

    name: str

    def get(self, key: str) -> tuple[ObjectMeta, bytes] | None: ...

    def put(self, meta: ObjectMeta, body: bytes) -> None: ...

    def delete(self, key: str) -> bool: ...


StoredHook = Callable[[Grant, str], None]
"""Called with the grant and the signed request target of every object committed."""


class UpstreamReason(StrEnum):
    NO_ENGINE = "no_engine"
    CAPABILITY = "capability"
    OVERLOAD = "overload"
    QUEUE = "queue"
    ENGINE_ERROR = "engine_error"


class Producer:
    def __init__(
        self,
        config: NodeConfig,
        renderer: Renderer | None,
        upstreams: Upstreams,
        store: DiskStore,
        hot: HotTier,
        metrics: Metrics,
        io: ThreadPoolExecutor,
    ) -> None:
        self.config = config
        self.renderer = renderer
        self.upstreams = upstreams
        self.store = store
        self.hot = hot
        self.metrics = metrics
        self.io = io
        self.persistent: PersistentStore | None = None
        self.on_stored: list[StoredHook] = []

    def choose(self, grant: Grant) -> Engine | UpstreamReason:
        """The local engine to render with, or why to go upstream instead."""
        engine = self.renderer.engine_for(grant.spec) if self.renderer else None
        if engine is None or self.renderer is None:
            if self._unhonoured(grant.spec) is not None:
                return UpstreamReason.CAPABILITY
            return UpstreamReason.NO_ENGINE
        if engine.refuses(grant.spec) is not None:
            return UpstreamReason.CAPABILITY
        if not self.upstreams.available:
            return engine  # nowhere else to go: queue here
        if self.renderer.queue_full(engine):
            return UpstreamReason.OVERLOAD
        if self.renderer.estimated_wait(engine) > self.upstreams.estimated_first_byte:
            return UpstreamReason.QUEUE
        return engine

    def _unhonoured(self, spec: Spec) -> str | None:
        """A control of `spec` that no engine of this node honours, by name (a node that
        renders nothing honours none); None when some engine here honours them all."""
        used = spec.controls()
        if not used or (self.renderer is not None and self.renderer.honours(used)):
            return None
        return min(used)

    async def produce(self, fill: Fill, grant: Grant, target: str) -> None:
        """Fills `fill` and commits the result. Never raises: failures mark the fill."""
        try:
            if await self._from_persistent(fill, grant):
                async with fill.writing():
                    meta = await self._commit(fill, grant)
                fill.finish(meta)
                return
            choice = self.choose(grant)
            if isinstance(choice, UpstreamReason):
                await self._fetch(fill, grant, target, choice)
            else:
                try:
                    await self._render(fill, grant, choice)
                except RenderRefused as exc:  # no tier would render it: a 400
                    raise FillFailed(exc.code, str(exc)) from exc
                except RenderError as exc:
                    log.warning("render of %s failed: %s", grant.spec.key, exc)
                    if fill.size or not self.upstreams.available:
                        raise FillFailed(
                            "render_failed", str(exc), retry_after=RENDER_RETRY_AFTER
                        ) from exc
                    await self._fetch(fill, grant, target, UpstreamReason.ENGINE_ERROR)
            if fill.length is not None and fill.size != fill.length:
                raise FillFailed(
                    "length_mismatch",
                    f"the object ended at {fill.size} of the {fill.length} bytes announced",
                    retry_after=RENDER_RETRY_AFTER,
                )
            async with fill.writing():  # a purge meanwhile waits for it (Fill.settled)
                meta = await self._commit(fill, grant)
                await self._persist(meta, fill)
            fill.finish(meta)
            if fill.stored:
                for hook in self.on_stored:
                    hook(grant, target)
        except FillFailed as exc:
            fill.fail(exc)
        except Exception as exc:
            log.exception("producing %s failed", grant.spec.key)
            fill.fail(FillFailed("internal_error", type(exc).__name__, RENDER_RETRY_AFTER))

    async def _from_persistent(self, fill: Fill, grant: Grant) -> bool:
        """Fills from the persistent store when the object is already there."""
        if self.persistent is None or not grant.policy.stored:
            return False
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(self.io, self.persistent.get, grant.spec.key)
        except Exception:  # an unreadable store means render instead, not fail
            log.exception("persistent store %s failed a read", self.persistent.name)
            return False
        if found is None:
            return False
        meta, body = found
        fill.start(meta.content_type, meta.etag)
        fill.set_length(len(body))
        fill.append(body)
        return True

    async def _persist(self, meta: ObjectMeta, fill: Fill) -> None:
        """Keeps a new render in the persistent store. A full or read-only store is logged
        and counted; the listeners have their audio either way."""
        if self.persistent is None or not meta.policy.stored or fill.is_purged():
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.io, self.persistent.put, meta, fill.body())
        except Exception as exc:  # full, read-only or broken: logged and counted
            log.error("persistent store %s refused %s: %s", self.persistent.name, meta.key, exc)
            self.metrics.store_errors.inc()
            return
        if fill.is_purged():  # purged while the write ran: undo it, as _commit does
            await loop.run_in_executor(self.io, self.persistent.delete, meta.key)

    async def _render(self, fill: Fill, grant: Grant, engine: Engine) -> None:
        assert self.renderer is not None
        if self.renderer.queue_full(engine):
            raise FillFailed("overloaded", "render queue is full", retry_after=RENDER_RETRY_AFTER)
        fill.start(self.renderer.content_type(engine, grant.spec), etag_for(grant.spec.key))
        await self.renderer.render(
            engine, grant.spec, fill.append, fill.set_length, fill.length_follows
        )
        # The last chunks were handed over with call_soon_threadsafe; let them land.
        await asyncio.sleep(0)

    async def _fetch(self, fill: Fill, grant: Grant, target: str, reason: UpstreamReason) -> None:
        if not self.upstreams.available and reason is UpstreamReason.CAPABILITY:
            engine = self.renderer.engine_for(grant.spec) if self.renderer else None
            control = engine.refuses(grant.spec) if engine else self._unhonoured(grant.spec)
            raise FillFailed("unsupported_control", f"no engine here honours {control!r}")
        if not self.upstreams.available:
            voices = ", ".join(self.renderer.voices) if self.renderer else "none"
            raise FillFailed(
                "no_renderer",
                f"this node renders {voices} and has no upstream for {grant.spec.voice!r}",
                retry_after=RENDER_RETRY_AFTER,
            )
        self.metrics.upstream.labels(reason.value).inc()
        async with self.upstreams.fetch(grant.spec.key, target) as fetched:
            await receive(fill, fetched, grant.spec.key, source="upstream", from_upstream=True)
        if grant.policy.stored:  # drafts are never kept (and a HEAD would render one again)
            # End to end: the digest the upstream declared (or confirms with a HEAD, for an
            # object it was still producing) must match the bytes received, or nothing is kept.
            loop = asyncio.get_running_loop()
            fill.sha256 = await loop.run_in_executor(self.io, _sha256, fill.body())
            if not await self.upstreams.confirm(
                grant.spec.key, target, fetched, fill.size, fill.sha256
            ):
                raise FillFailed(
                    "upstream_corrupt",
                    f"{fetched.base} sent bytes that do not match the object's checksum",
                    retry_after=RENDER_RETRY_AFTER,
                )

    async def _commit(self, fill: Fill, grant: Grant) -> ObjectMeta:
        body = fill.body()
        assert fill.content_type is not None and fill.etag is not None
        loop = asyncio.get_running_loop()
        digest = fill.sha256
        if digest is None:
            digest = await loop.run_in_executor(self.io, _sha256, body)
        meta = ObjectMeta(
            key=grant.spec.key,
            content_type=fill.content_type,
            length=len(body),
            etag=fill.etag,
            sha256=digest,
            policy=grant.policy,
            stored_at=fill.started_at,
            ttl=self.config.retention.ttl(grant.policy),
        )
        if not grant.policy.stored or fill.is_purged():
            return meta
        try:
            evicted = await loop.run_in_executor(self.io, self.store.put, meta, body)
        except Exception:  # a store failure must never cost the listeners their audio
            log.exception("could not store %s", meta.key)
            self.metrics.store_errors.inc()
            return meta
        self.metrics.evictions.inc(evicted)
        if fill.is_purged():  # purged while the commit ran: undo it
            await loop.run_in_executor(self.io, self.store.delete, meta.key)
            return meta
        fill.stored = True
        if len(body) <= self.config.hot.max_object_bytes:
            self.hot.put(meta, body=body, fd=-1, now=meta.stored_at)
        return meta


async def receive(
    fill: Fill, fetched: Fetched, key: str, *, source: str, from_upstream: bool
) -> None:
    """Streams another node's answer into `fill`: an upstream's, or the owning worker's
    (edge.workers). The bytes keep the ETag, and so the render revision, they were made
    with; a length the source knows is announced before the first byte, so this node
    answers exact ranges while the bytes are still arriving; a body that ends short of its
    Content-Length fails. Error codes start with `source`."""
    etag = fetched.response.headers.get(hdrs.ETAG, "")
    if revision_of(key, etag) is None:
        raise FillFailed(
            f"{source}_corrupt",
            f"{fetched.base} answered with an ETag that is not this object's",
            retry_after=RENDER_RETRY_AFTER,
        )
    fill.start(fetched.content_type, etag, from_upstream=from_upstream)
    fill.set_length(fetched.content_length)
    async for chunk in fetched.chunks():
        fill.append(chunk)
    expected = fetched.content_length
    if expected is not None and fill.size != expected:
        raise FillFailed(f"{source}_truncated", f"{source} sent {fill.size} of {expected} bytes")


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
