"""The disk tier, on diskcache.

Writes follow diskcache's own discipline, with verification in front of it: the body is
written to a staging file and fsynced, its length and SHA-256 are checked against the
metadata, and only then is the file renamed into diskcache's value store and the index row
committed; the file it replaces is removed after the commit. A crash at any point leaves
either the old object, the new one, or an orphan staging file that nothing can serve.

Reads take one executor call (`open`), which returns an `Opened` outcome. On a hit it
hands back an open file descriptor checked with fstat, which the caller sends with
sendfile. Eviction is approximate LRU: recency is recorded in memory on the hot path and
written back in batches (`refresh`), so a hit costs one indexed SELECT and no write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import Any

import diskcache

from edge.cache.meta import ObjectMeta
from edge.checks import at_least

STAGING_DIR = "staging"
MIN_SIZE_LIMIT = 1024**2  # bytes: below this the index alone fills the store


@dataclass(frozen=True, slots=True)
class StoreSettings:
    size_limit: int = 10 * 1024**3
    """Bytes of value files and index the store may hold before evicting."""
    stale_keep: int = 86400
    """Seconds an expired object is kept on disk for stale-if-error before it may be culled."""
    sqlite_mmap: int = 64 * 1024**2
    """Bytes of the index that SQLite may memory-map."""

    def validate(self) -> None:
        at_least(self, "size_limit", MIN_SIZE_LIMIT)
        at_least(self, "stale_keep", 0)
        at_least(self, "sqlite_mmap", 0)


class Staged:
    """A verified, fsynced body file in the staging directory, ready to be adopted."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size


class _AdoptingDisk(diskcache.Disk):  # type: ignore[misc]
    """Moves a `Staged` file into the value store with one rename instead of copying it."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, Staged):
            filename, full_path = self.filename(key, value)
            # diskcache creates value directories lazily in its own writer; so do we.
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            os.replace(value.path, full_path)
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key=key)


class Outcome(Enum):
    HIT = auto()
    MISS = auto()
    CORRUPT = auto()  # the row's file was missing or of the wrong size; the row is dropped


@dataclass(slots=True)
class Opened:
    outcome: Outcome
    meta: ObjectMeta | None = None
    fd: int = -1
    body: bytes | None = None
    """The body itself, read in the same call when it is small enough for the hot tier."""


class VerificationError(Exception):
    """A body did not match its metadata; nothing was stored."""


class DiskStore:
    def __init__(self, directory: Path, settings: StoreSettings) -> None:
        self.directory = directory
        self.settings = settings
        self.staging = directory / STAGING_DIR
        # Anything left in staging was never committed: a crash interrupted its write.
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(
            str(directory),
            disk=_AdoptingDisk,
            size_limit=settings.size_limit,
            eviction_policy="least-recently-stored",
            cull_limit=0,  # we cull after each commit, to count evictions
            disk_min_file_size=0,  # every body is a file, so every hit can use sendfile
            sqlite_mmap_size=settings.sqlite_mmap,
            statistics=False,
        )

    def close(self) -> None:
        self._cache.close()

    # -- reads ------------------------------------------------------------------------------
    def open(self, key: str, read_below: int = 0) -> Opened:
        """Looks `key` up and opens its body; blocking, for an executor."""
        handle, tag = self._cache.get(key, default=None, read=True, tag=True)
        if handle is None:
            # diskcache answers "absent" both for no row and for a row whose value file
            # has vanished; only the second leaves a row behind, which must go.
            if key in self._cache:
                self._cache.delete(key)
                return Opened(Outcome.CORRUPT)
            return Opened(Outcome.MISS)
        meta = ObjectMeta.from_tag(tag)
        with handle:
            fd = os.dup(handle.fileno())
        size = os.fstat(fd).st_size
        if size != meta.length:
            os.close(fd)
            self._cache.delete(key)
            return Opened(Outcome.CORRUPT)
        if size <= read_below:
            body = os.pread(fd, size, 0)
            os.close(fd)
            return Opened(Outcome.HIT, meta, body=body)
        return Opened(Outcome.HIT, meta, fd=fd)

    def contains(self, key: str) -> bool:
        return key in self._cache

    # -- writes -----------------------------------------------------------------------------
    def stage(self, body: bytes) -> Staged:
        fd, name = tempfile.mkstemp(dir=self.staging, suffix=".part")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Staged(path, len(body))

    def commit(self, meta: ObjectMeta, staged: Staged) -> int:
        """Verifies `staged` against `meta`, then publishes it. Returns objects evicted."""
        try:
            self._verify(meta, staged)
            expire = meta.ttl + self.settings.stale_keep
            self._cache.set(meta.key, staged, read=True, tag=meta.to_tag(), expire=expire)
        finally:
            staged.path.unlink(missing_ok=True)
        return int(self._cache.cull())

    def put(self, meta: ObjectMeta, body: bytes) -> int:
        return self.commit(meta, self.stage(body))

    @staticmethod
    def _verify(meta: ObjectMeta, staged: Staged) -> None:
        digest = hashlib.sha256()
        size = 0
        with staged.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        if size != meta.length or digest.hexdigest() != meta.sha256:
            raise VerificationError(f"body of {meta.key} does not match its metadata")

    def delete(self, key: str) -> bool:
        return bool(self._cache.delete(key))

    def refresh(self, keys: Iterable[str], now: float | None = None) -> None:
        """Marks `keys` as recently used, so size eviction takes colder objects first."""
        stamp = time.time() if now is None else now
        rows = [(stamp, key) for key in keys]
        if not rows:
            return
        with contextlib.suppress(diskcache.Timeout), self._cache.transact():
            # diskcache has no public batch update of recency; this is its own index table.
            self._cache._con.executemany(
                "UPDATE Cache SET store_time = ? WHERE key = ? AND raw = 1", rows
            )

    # -- accounting -------------------------------------------------------------------------
    def volume(self) -> int:
        return int(self._cache.volume())

    def count(self) -> int:
        return len(self._cache)
