"""Open realtime sessions per tenant, counted for the node, whichever worker holds them
(docs/contracts.md#realtime-speech: at most `realtime_sessions` per tenant).

A worker counting only its own sessions would let a tenant hold N times its limit on a
node of `--workers N`. `SharedSeats` keeps the count in a small file every worker maps: a
row per tenant (the sorted tenants of NEARVOICE_API_KEYS, the same in every worker), a
column per worker. A worker writes only its own column, and checks and takes a seat under
a POSIX byte-range lock on the tenant's row (fcntl.lockf), so two workers can never both
take the last seat. A worker zeroes its column when it starts: a worker that died took its
sessions' connections with it, and the one the supervisor starts in its place must not
find them still counted.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path


class Seats:
    """Open sessions per tenant in this process: what a node of one worker needs."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def enter(self, tenant: str, limit: int) -> bool:
        """Takes a seat for `tenant` if fewer than `limit` are taken; False otherwise."""
        if self.open.get(tenant, 0) >= limit:
            return False
        self.open[tenant] = self.open.get(tenant, 0) + 1
        return True

    def leave(self, tenant: str) -> None:
        """Gives back a seat `enter` took."""
        self.open[tenant] -= 1
        if not self.open[tenant]:
            del self.open[tenant]

    def close(self) -> None:
        pass


class SharedSeats(Seats):
    """Seats counted in a file the node's workers share. A tenant without a row (its key
    removed from NEARVOICE_API_KEYS while one of its session tokens is still valid) is
    counted in this process only, as `Seats` counts."""

    COUNT = struct.Struct("<I")

    def __init__(self, path: Path, tenants: Sequence[str], workers: int, worker: int) -> None:
        super().__init__()
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} is not one of {workers}")
        self._rows = {tenant: row for row, tenant in enumerate(sorted(set(tenants)))}
        self._row_size = workers * self.COUNT.size
        self._column = worker * self.COUNT.size
        size = max(1, len(self._rows)) * self._row_size
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size != size:
            # Left by a node with other tenants or workers: every worker of this one
            # zeroes its own column below, so what the old counts said does not matter.
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        for row in self._rows.values():
            with self._locked(row):
                self.COUNT.pack_into(self._map, row * self._row_size + self._column, 0)

    def _locked(self, row: int) -> _RowLock:
        return _RowLock(self._fd, row * self._row_size, self._row_size)

    def enter(self, tenant: str, limit: int) -> bool:
        row = self._rows.get(tenant)
        if row is None:
            return super().enter(tenant, limit)
        start = row * self._row_size
        with self._locked(row):
            counts = struct.unpack_from(f"<{self._row_size // 4}I", self._map, start)
            if sum(counts) >= limit:
                return False
            own = start + self._column
            self.COUNT.pack_into(self._map, own, self.COUNT.unpack_from(self._map, own)[0] + 1)
            return True

    def leave(self, tenant: str) -> None:
        if self._map.closed:  # a session ending after its node's shutdown: nothing to count
            return
        row = self._rows.get(tenant)
        if row is None:
            super().leave(tenant)
            return
        own = row * self._row_size + self._column
        with self._locked(row):
            count = self.COUNT.unpack_from(self._map, own)[0]
            self.COUNT.pack_into(self._map, own, max(0, count - 1))

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class _RowLock:
    """An exclusive POSIX lock on one row's bytes, for a `with` block."""

    __slots__ = ("_fd", "_length", "_start")

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._fd, self._start, self._length = fd, start, length

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, self._length, self._start)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, self._length, self._start)
