"""The disk tier, on diskcache.

Writes follow diskcache's own discipline, with verification in front of it: the body is
written to a staging file and fsynced, its length and SHA-256 are checked against the
metadata, and only then is the file renamed into diskcache's value store and the index row
committed (the value directory fsynced first, so the rename is durable before the row that
points at it); the file it replaces is removed after the commit. A crash at any point
leaves either the old object, the new one, an orphan staging file that nothing can serve
(removed at start), or an orphan value file (collected at start once old enough).

Reads take one executor call (`open`), which returns an `Opened` outcome. On a hit it
hands back an open file descriptor checked with fstat, which the caller sends with
sendfile. Eviction is approximate LRU: recency is recorded in memory on the hot path and
written back in batches (`refresh`), so a hit costs one indexed SELECT and no write. It
removes as few objects as it takes to get under `size_limit`, and the filesystem's own
limit wins over `size_limit`: a full disk (ENOSPC) evicts and the store is tried again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import Any

import diskcache

from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.checks import at_least

log = logging.getLogger("nearvoice.store")
STAGING_DIR = "staging"
MIN_SIZE_LIMIT = 1024**2  # bytes: below this the index alone fills the store
ORPHAN_AGE = 300.0  # seconds before a value file without an index row is collected
DISK_FULL_RETRIES = 3  # times a store evicts and tries again when the filesystem is full
RESERVE_SHARE = 20  # min_free is at most 1/20 of the filesystem
EVICT_BATCH = 16  # index rows read at a time while evicting


@dataclass(frozen=True, slots=True)
class StoreSettings:
    size_limit: int = 10 * 1024**3
    """Bytes of value files and index the store may hold before evicting."""
    stale_keep: int = 86400
    """Seconds an expired object is kept on disk for stale-if-error before it may be culled."""
    sqlite_mmap: int = 64 * 1024**2
    """Bytes of the index that SQLite may memory-map."""
    min_free: int = 64 * 1024**2
    """Bytes the store leaves free on its filesystem (at most 5 % of the filesystem): past
    this it evicts, whatever `size_limit` says, so the index has room to record deletes."""

    def validate(self) -> None:
        at_least(self, "size_limit", MIN_SIZE_LIMIT)
        at_least(self, "stale_keep", 0)
        at_least(self, "sqlite_mmap", 0)
        at_least(self, "min_free", 0)


class Staged:
    """A verified, fsynced body file in the staging directory, ready to be adopted."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.adopted: str | None = None
        """Where the value store took the file, once it has."""


class _AdoptingDisk(diskcache.Disk):  # type: ignore[misc]
    """Moves a `Staged` file into the value store with one rename instead of copying it."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, Staged):
            filename, full_path = self.filename(key, value)
            directory = os.path.dirname(full_path)
            # diskcache creates value directories lazily in its own writer; so do we.
            created = not os.path.isdir(directory)
            os.makedirs(directory, exist_ok=True)
            os.replace(value.path, full_path)
            value.adopted = full_path
            # The rename is durable only once its directory is: sync it (and the parents
            # of a directory just made) before the index row that points at the file.
            _fsync_dir(directory)
            if created:
                _fsync_dir(os.path.dirname(directory))
                _fsync_dir(os.path.dirname(os.path.dirname(directory)))
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key=key)


def _disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the filesystem is full (from the kernel, or from SQLite)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "full" in str(exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._evicting = threading.Lock()
        orphans = self.collect_orphans()
        if orphans:
            log.warning("removed %d value file(s) no index row pointed at", orphans)
        room = self.free_bytes() + self.volume()
        if room < settings.size_limit:
            log.warning(
                "[store] size_limit is %d bytes but %s has room for %d; the cache will "
                "evict when the filesystem fills, not at its size_limit",
                settings.size_limit,
                directory,
                room,
            )

    def close(self) -> None:
        self._cache.close()

    # -- reads ------------------------------------------------------------------------------
    def open(self, key: str, read_below: int = 0) -> Opened:
        """Looks `key` up and opens its body; blocking, for an executor."""
        handle, tag = self._cache.get(key, default=None, read=True, tag=True)
        if handle is None:
            if key not in self._cache:
                return Opened(Outcome.MISS)
            # diskcache answers "absent" both for no row and for a row whose value file
            # has vanished; only the second leaves a row behind, which must go. But a
            # refill of the key may have committed between the two looks: look again
            # under the index's write lock, which every commit takes, before deleting.
            with self._cache.transact():
                handle, tag = self._cache.get(key, default=None, read=True, tag=True)
                if handle is None:
                    return Opened(Outcome.CORRUPT if self._cache.delete(key) else Outcome.MISS)
        meta = ObjectMeta.from_tag(tag)
        with handle:
            fd = os.dup(handle.fileno())
        size = os.fstat(fd).st_size
        if size != meta.length:
            os.close(fd)
            self._delete_if_unchanged(key, tag)
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
            try:
                self._cache.set(meta.key, staged, read=True, tag=meta.to_tag(), expire=expire)
            except BaseException:
                self._undo_adoption(staged)
                raise
        finally:
            staged.path.unlink(missing_ok=True)
        return int(self._cache.expire()) + self.shrink()

    def _undo_adoption(self, staged: Staged) -> None:
        """After a failed index commit (a full disk): the value file no row points at goes,
        and so does the transaction a failed COMMIT leaves open on this thread's
        connection (diskcache considers it ended)."""
        if staged.adopted is not None:
            Path(staged.adopted).unlink(missing_ok=True)
        with contextlib.suppress(sqlite3.Error):
            self._cache._con.execute("ROLLBACK")

    def put(self, meta: ObjectMeta, body: bytes) -> int:
        """Stages and commits `body`. A full filesystem (whatever `size_limit` says) makes
        room by evicting the oldest objects and tries again. Returns objects evicted."""
        evicted = 0
        for attempt in range(DISK_FULL_RETRIES + 1):
            try:
                return evicted + self.commit(meta, self.stage(body))
            except (OSError, sqlite3.OperationalError) as exc:
                if attempt == DISK_FULL_RETRIES or not _disk_full(exc):
                    raise
                freed = self.evict(bytes_wanted=2 * len(body) + self.reserve())
                log.warning(
                    "filesystem full storing %s (%d bytes): evicted %d object(s)",
                    meta.key,
                    len(body),
                    freed,
                )
                if not freed:
                    raise
                evicted += freed
        raise AssertionError("unreachable")  # pragma: no cover

    # -- eviction ---------------------------------------------------------------------------
    def shrink(self) -> int:
        """Evicts the least recently used objects, as few as it takes, until the store is
        within `size_limit` and leaves `min_free` bytes free. Returns how many."""
        over = self.volume() - self.settings.size_limit
        short = self.reserve() - self.free_bytes()
        if over <= 0 and short <= 0:
            return 0
        return self.evict(bytes_wanted=max(over, short))

    def evict(self, bytes_wanted: int) -> int:
        """Deletes objects, least recently used first, until their sizes add up to
        `bytes_wanted` or none is left; returns how many. (diskcache's own cull deletes
        ten at a time, which on a small cache empties most of it.)"""
        evicted = 0
        freed = 0
        with self._evicting:
            while freed < bytes_wanted:
                rows = self._cache._con.execute(
                    "SELECT key, size, filename FROM Cache WHERE raw = 1"
                    " ORDER BY store_time LIMIT ?",
                    (EVICT_BATCH,),
                ).fetchall()
                if not rows:
                    break
                for key, size, filename in rows:
                    # The file first: on a full disk, SQLite needs the room it frees to
                    # record the delete. (A reader between the two sees a row without
                    # its file, which it drops as corrupt: the same end.)
                    if filename is not None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.directory / filename)
                    if self._cache.delete(key):
                        evicted += 1
                    freed += int(size)
                    if freed >= bytes_wanted:
                        break
        return evicted

    def reserve(self) -> int:
        """Bytes to leave free: `min_free`, or 5 % of a smaller filesystem."""
        info = os.statvfs(self.directory)
        return min(self.settings.min_free, info.f_blocks * info.f_frsize // RESERVE_SHARE)

    def free_bytes(self) -> int:
        """Bytes free to this process on the store's filesystem."""
        info = os.statvfs(self.directory)
        return info.f_bavail * info.f_frsize

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

    def _delete_if_unchanged(self, key: str, tag: str) -> None:
        """Deletes `key`'s row only if it is still the one tagged `tag`: a refill that
        committed since it was read is a different, good object."""
        with self._cache.transact():
            row = self._cache._con.execute(
                "SELECT tag FROM Cache WHERE key = ? AND raw = 1", (key,)
            ).fetchone()
            if row is not None and row[0] == tag:
                self._cache.delete(key)

    def collect_orphans(self, older_than: float = ORPHAN_AGE) -> int:
        """Removes value files that no index row points at, left by a crash between the
        rename into the value store and the index commit; returns how many. Only files
        older than `older_than` seconds: a sibling worker may be between the two steps."""
        known = {
            row[0]
            for row in self._cache._con.execute(
                "SELECT filename FROM Cache WHERE filename IS NOT NULL"
            )
        }
        cutoff = time.time() - older_than
        removed = 0
        for path in self.directory.rglob("*.val"):
            name = str(path.relative_to(self.directory))
            if name in known or name.startswith(STAGING_DIR + os.sep):
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

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
