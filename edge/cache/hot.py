"""The hot tier: recently served objects, answered without an executor call or a disk read.

Small objects are held as bytes. Larger ones are held as an open file descriptor, like
nginx's open_file_cache, and sent with sendfile; the descriptor is reference counted so an
entry evicted while a response is still sending it is closed only when that send ends.

An entry is trusted for `revalidate_after` seconds and then looked up on disk again, which
bounds how long an object evicted from disk by another worker can still be served. Purges
are seen at once: every worker checks the shared purge stamp (one stat) before a hot hit.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.checks import at_least, require


@dataclass(frozen=True, slots=True)
class HotSettings:
    max_object_bytes: int = 2 * 1024**2
    """Objects up to this many bytes are held in memory; larger ones by descriptor."""
    memory_budget: int = 256 * 1024**2
    """Bytes of bodies the tier may hold in memory."""
    max_open_files: int = 1024
    """Descriptors the tier may hold open."""
    revalidate_after: float = 10.0
    """Seconds an entry is served before the disk store is asked again."""

    def validate(self) -> None:
        for name in ("max_object_bytes", "memory_budget", "max_open_files", "revalidate_after"):
            at_least(self, name, 0)
        require(
            self.max_object_bytes <= self.memory_budget,
            "max_object_bytes",
            f"{self.max_object_bytes} is more than memory_budget ({self.memory_budget})",
        )


class SharedFile:
    """An open descriptor shared by the tier and the responses sending it."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 1  # the tier's own reference

    def acquire(self) -> SharedFile:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            os.close(self.fd)


@dataclass(slots=True)
class HotEntry:
    meta: ObjectMeta
    body: bytes | None
    file: SharedFile | None
    checked_at: float
    prepared: dict[Hashable, object] = field(default_factory=dict)
    """Answers about this object made ready by the fast path (edge.http.fastpath), keyed
    by what they depend on; they go with the entry."""

    @property
    def memory(self) -> int:
        return len(self.body) if self.body is not None else 0


class PurgeStamp:
    """A file that grows by one byte on every purge, shared by all workers of a node.

    O_APPEND writes are atomic, so two workers purging at once still leave two bytes and
    no purge goes unseen; its size is the purge count.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch(exist_ok=True)
        self.seen = self.read()

    def read(self) -> int:
        return os.stat(self.path).st_size

    def bump(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)

    def changed(self) -> bool:
        current = self.read()
        if current != self.seen:
            self.seen = current
            return True
        return False


class HotTier:
    def __init__(self, settings: HotSettings) -> None:
        self.settings = settings
        self._entries: OrderedDict[str, HotEntry] = OrderedDict()
        self._memory = 0
        self._files = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def memory(self) -> int:
        return self._memory

    def get(self, key: str, now: float) -> HotEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now - entry.checked_at > self.settings.revalidate_after or not entry.meta.fresh(now):
            self.drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, meta: ObjectMeta, *, body: bytes | None, fd: int, now: float) -> HotEntry:
        """Adds an object; takes ownership of `fd` when no body is given."""
        self.drop(meta.key)
        file = SharedFile(fd) if body is None else None
        entry = HotEntry(meta, body, file, now)
        self._entries[meta.key] = entry
        self._memory += entry.memory
        self._files += file is not None
        self._shrink()
        return entry

    def drop(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._memory -= entry.memory
        if entry.file is not None:
            self._files -= 1
            entry.file.release()
        return True

    def clear(self) -> None:
        for key in list(self._entries):
            self.drop(key)

    def _shrink(self) -> None:
        """Evicts least recently used entries until within budget, but never the entry just
        added: its caller is about to send it (a lone entry over budget stays until the
        next put displaces it)."""
        limits = self.settings
        while len(self._entries) > 1 and (
            self._memory > limits.memory_budget or self._files > limits.max_open_files
        ):
            self.drop(next(iter(self._entries)))
