"""In-flight fills: one object being produced (rendered here or fetched upstream), shared by
every request for its key.

Single-flight: the first request for a key starts one producer task and every other request
joins its `Fill`. Read-while-write: readers stream the chunks already produced at once and
then wait for the next ones; all of them share the same immutable chunks, so 500 listeners
of one object cost one copy of it plus their sockets' buffers. The producer task belongs to
the node, not to any request, so a listener who hangs up stops nothing.

Sizing: before its first byte a fill says how long the object will be, when its source
knows (`set_length`): a local engine's duration pass, or an upstream's Content-Length.
Readers wait for that decision (`until_sized`), so every answer about an object of known
length is exact from the first byte (docs/contracts.md#exact-length-from-the-first-byte);
the producer fails the fill rather than let it end at any other length. A source whose
bytes never depend on the length (raw PCM, MP3) may say that the length follows its first
bytes (`length_follows`): readers that need the length still wait for it, while a reader
that needs none (the speech API's streams) can start with the first byte.

A fill that fails is marked failed and forgotten at once, so the next request starts afresh;
nothing of it is stored. A completed fill lingers for a short grace period so that requests
that missed the cache just before it was committed join it instead of rendering again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator
from enum import Enum, auto

from nearvoice.edge.cache.meta import ObjectMeta


class FillState(Enum):
    RUNNING = auto()
    DONE = auto()
    FAILED = auto()


class FillFailed(Exception):
    """The producer gave up; `code` is the JSON error code to report when no byte was sent.

    `status` is set only for an upstream's definitive answer about the object itself (404
    or 410, edge.upstream.RELAYED): the object does not exist anywhere, so the answer is
    relayed as it came, neither turned into a 502 nor masked by a stale copy."""

    def __init__(
        self, code: str, message: str, retry_after: int | None = None, *, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after
        self.status = status


class Fill:
    def __init__(self, key: str) -> None:
        self.key = key
        self.state = FillState.RUNNING
        self.content_type: str | None = None
        self.etag: str | None = None
        """The strong ETag of the bytes being produced; it names their render revision
        (edge.cache.meta.etag_for), which travels with the bytes from tier to tier."""
        self.length: int | None = None
        """The object's exact length, when the source announced it before its first byte."""
        self.sized = False
        """Whether the source has said if it knows the length (`set_length`)."""
        self.length_later = False
        """Whether the source said its length follows its first bytes (`length_follows`)."""
        self.started_at = time.time()
        """Unix seconds the fill began: the object's Last-Modified, in flight and stored."""
        self.from_upstream = False
        """Whether the bytes come from an upstream rather than a local render."""
        self.stored = False
        """Whether the finished object was committed to the disk store."""
        self.sha256: str | None = None
        """Hex digest of the complete body, once someone has computed it."""
        self.purged = False
        """Set by a purge: the object must not be committed or joined any more."""
        self._written = asyncio.Event()
        """Clear while the producer writes the object to the stores (`writing`)."""
        self._written.set()
        self.meta: ObjectMeta | None = None
        self.error: FillFailed | None = None
        self.first_byte_at: float | None = None
        self.readers = 0
        """Requests attached to this fill right now."""
        self._chunks: list[bytes] = []
        self._ends: list[int] = []  # cumulative end offset of each chunk
        self._size = 0
        self._changed = asyncio.Event()

    # -- producer side --------------------------------------------------------------------
    def start(self, content_type: str, etag: str, *, from_upstream: bool = False) -> None:
        """The source answered. A second source (an upstream after a render that failed
        before its first byte) must be producing the object the first one announced:
        listeners may already hold its ETag and length."""
        if self.etag is not None and etag != self.etag:
            raise FillFailed(
                "upstream_mismatch",
                f"the fallback source sends {etag}, not the announced {self.etag}",
                retry_after=1,
            )
        self.content_type = content_type
        self.etag = etag
        self.from_upstream = from_upstream
        self._notify()

    def set_length(self, length: int | None) -> None:
        """Announces the exact length (None: unknown until the end), before any byte. A
        second source may repeat the announced length or not know it; it may not change
        it (see `start`)."""
        if self.sized:
            if length is not None and self.length is not None and length != self.length:
                raise FillFailed(
                    "upstream_mismatch",
                    f"the fallback source sends {length} bytes, not the announced {self.length}",
                    retry_after=1,
                )
            return
        if self._size and not self.length_later:
            raise RuntimeError("a fill's length is announced before its first byte")
        self.length = length
        self.sized = True
        self._notify()

    def length_follows(self) -> None:
        """Says, before the first byte, that `set_length` comes after some bytes: until it
        does, the fill is not sized, whatever bytes it holds."""
        if self._size:
            raise RuntimeError("a fill's length is promised before its first byte")
        self.length_later = True

    def append(self, data: bytes) -> None:
        if not data or self.state is not FillState.RUNNING:
            return
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self._chunks.append(bytes(data))
        self._size += len(data)
        self._ends.append(self._size)
        self._notify()

    def finish(self, meta: ObjectMeta) -> None:
        self.meta = meta
        self.state = FillState.DONE
        self._notify()

    def fail(self, error: FillFailed) -> None:
        if self.state is FillState.RUNNING:
            self.error = error
            self.state = FillState.FAILED
            self._notify()

    def _notify(self) -> None:
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- reader side ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def is_purged(self) -> bool:
        return self.purged

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Around the producer's writes of this object to the stores, and its undoing of
        them when a purge lands meanwhile (`settled`)."""
        self._written.clear()
        try:
            yield
        finally:
            self._written.set()

    async def settled(self) -> None:
        """Returns once no write of this object is under way. A purge marks the fill and
        deletes the object, but a write already in a store's thread can land after that
        delete; its producer sees the mark and deletes it again. The purge waits here
        before it answers, or a request right after it could read the purged bytes."""
        await self._written.wait()

    def is_running(self) -> bool:
        return self.state is FillState.RUNNING

    def body(self) -> bytes:
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
            self._ends = [self._size]
        return self._chunks[0] if self._chunks else b""

    async def changed(self) -> None:
        await self._changed.wait()

    def raise_if_failed(self) -> None:
        if self.state is FillState.FAILED:
            assert self.error is not None
            raise self.error

    async def until_started(self) -> None:
        """Until the content type is known (the source answered) or the fill failed."""
        while self.content_type is None and self.is_running():
            await self.changed()
        self.raise_if_failed()

    async def until_sized(self) -> None:
        """Until the source said whether it knows the length, or the fill ended. A fill
        that starts producing bytes without saying has an unknown length, unless it said
        that the length follows them."""
        while self.is_running() and not self.sized and (self.length_later or not self._size):
            await self.changed()
        self.raise_if_failed()

    async def until_size(self, size: int) -> None:
        """Until at least `size` bytes exist or the fill ended."""
        while self._size < size and self.is_running():
            await self.changed()
        self.raise_if_failed()

    async def until_done(self) -> ObjectMeta:
        while self.is_running():
            await self.changed()
        self.raise_if_failed()
        assert self.meta is not None
        return self.meta

    async def read(self, start: int, end: int | None) -> AsyncIterator[memoryview]:
        """Yields bytes [start, end) as they are produced (`end` None: to the end).

        Views, never copies: every listener of an object shares its chunks, which is what
        keeps 500 listeners of one render at one copy of it (slicing `bytes` would copy,
        and after `body()` merges the chunks a late listener would copy the whole object).
        """
        offset = start
        while end is None or offset < end:
            if offset >= self._size:
                if not self.is_running():
                    self.raise_if_failed()
                    return
                await self.changed()
                continue
            index = bisect.bisect_right(self._ends, offset)
            chunk = self._chunks[index]
            chunk_start = self._ends[index] - len(chunk)
            piece = memoryview(chunk)[
                offset - chunk_start : (None if end is None else end - chunk_start)
            ]
            offset += len(piece)
            yield piece
