"""In-flight fills: one object being produced (rendered here or fetched upstream), shared by
every request for its key.

Single-flight: the first request for a key starts one producer task and every other request
joins its `Fill`. Read-while-write: readers stream the chunks already produced at once and
then wait for the next ones; all of them share the same immutable chunks, so 500 listeners
of one object cost one copy of it plus their sockets' buffers. The producer task belongs to
the node, not to any request, so a listener who hangs up stops nothing.

A fill that fails is marked failed and forgotten at once, so the next request starts afresh;
nothing of it is stored. A completed fill lingers for a short grace period so that requests
that missed the cache just before it was committed join it instead of rendering again.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator
from enum import Enum, auto

from edge.cache.meta import ObjectMeta


class FillState(Enum):
    RUNNING = auto()
    DONE = auto()
    FAILED = auto()


class FillFailed(Exception):
    """The producer gave up; `code` is the JSON error code to report when no byte was sent."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class Fill:
    def __init__(self, key: str) -> None:
        self.key = key
        self.state = FillState.RUNNING
        self.content_type: str | None = None
        self.from_upstream = False
        """Whether the bytes come from an upstream rather than a local render."""
        self.stored = False
        """Whether the finished object was committed to the disk store."""
        self.sha256: str | None = None
        """Hex digest of the complete body, once someone has computed it."""
        self.purged = False
        """Set by a purge: the object must not be committed or joined any more."""
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
    def start(self, content_type: str, *, from_upstream: bool = False) -> None:
        self.content_type = content_type
        self.from_upstream = from_upstream
        self._notify()

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
