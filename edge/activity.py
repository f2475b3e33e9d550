"""Whether a render is alone on its node: no other render or duration pass in flight, and
no other request lately.

A render's first piece (the duration pass of its first chunk, then its first window) runs
on two onnxruntime threads. Sessions whose threads sleep between operators pay a wake-up
for each operator they share out, a few hundred of them in a first piece; sessions whose
threads spin pay none, but take the cores from whatever else runs beside them for as long
as the piece lasts. Measured on piper's `joe` (20 first pieces x 4, p50): 29.9 ms to the
first window sleeping, 26.9 spinning, alone. Beside another render, spinning lost far
more than it gained (68.6 ms against 46.6, and the other render slowed too); beside hits
served back to back, their p99 went from 2.2 to 3.3 ms to 5.9 to 6.7 ms while the piece
ran. So a first piece spins only when its render is alone
(edge.synth.durations.Durations.spinning): the common case at a quiet node, and the one
whose first byte a listener waits for with nothing else to blame.

What counts:

* Renders, from the moment the renderer (edge.synth.renderer) queues one to its end,
  and duration passes, from their submission to their end. A WAV miss's pass counts the
  whole text beside its first piece (the header states the length), so that piece does
  not spin; a PCM miss whose reader takes the length later (the speech API's) starts its
  pass once its first chunk has left, so that one does.
* Requests, any door's, hits on the fast path included (`request`): a render is not alone
  if another request came within `QUIET_SECONDS` before its own.
* The node's other workers (`--workers N`) share its cores: each keeps its count and its
  latest request's time in its own slot of a file that all of them map (`share`, set up
  by edge.node).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

QUIET_SECONDS = 0.05
"""How long before a render's own request the node must have had no other for the render
to count as alone: steady traffic of 20 requests a second or more keeps every first
piece on the sleeping threads."""

SLOT = struct.Struct("<qd")
"""One worker's slot in the shared file: its renders and passes in flight, and the
CLOCK_MONOTONIC time (system-wide on Linux) of its latest request. Written only by that
worker, each field by one writer (the count under `Activity._lock`, the time by the
event loop), and read by the others without a lock: a read that races a write sees a
value from before or after it, either of which was true."""
COUNT = struct.Struct("<q")
LATEST = struct.Struct("<d")


class Activity:
    """Renders and passes in flight, and when requests came: this process's and, once
    `share`d, its sibling workers'."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._renders = 0
        self._latest = -1e9
        """When the latest request came."""
        self._earlier = -1e9
        """When the request before it came."""
        self._shared: mmap.mmap | None = None
        self._slot = 0

    def share(self, path: Path, index: int, workers: int) -> None:
        """Keeps this worker's figures in slot `index` of `path`, a file of `workers` slots
        that every worker of the node maps. A worker that dies with renders in flight
        leaves its count behind until it is restarted and shares again (its siblings'
        first pieces sleep meanwhile: the safe side)."""
        size = workers * SLOT.size
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            shared = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the file
        with self._lock:
            self._slot = index * SLOT.size
            SLOT.pack_into(shared, self._slot, self._renders, self._latest)
            self._shared = shared

    def started(self) -> None:
        """One more render or pass in flight; each is `ended` once, whatever becomes of
        it."""
        with self._lock:
            self._renders += 1
            self._publish_count()

    def ended(self) -> None:
        with self._lock:
            self._renders -= 1
            self._publish_count()

    def request(self) -> None:
        """A request came in (called on the event loop, for every request it reads)."""
        now = self._clock()
        self._earlier, self._latest = self._latest, now
        if self._shared is not None:
            LATEST.pack_into(self._shared, self._slot + COUNT.size, now)

    def alone(self) -> bool:
        """Whether the caller's render is alone: at most one render or pass in flight (its
        own), and no other request within `QUIET_SECONDS` before its own; in this worker
        and its siblings together."""
        now = self._clock()
        if self._renders > 1 or now - self._earlier < QUIET_SECONDS:
            return False
        shared = self._shared
        if shared is None:
            return True
        renders = self._renders
        for offset in range(0, len(shared), SLOT.size):
            if offset != self._slot:
                theirs, latest = SLOT.unpack_from(shared, offset)
                renders += theirs
                if now - latest < QUIET_SECONDS:
                    return False
        return bool(renders <= 1)

    @property
    def renders(self) -> int:
        return self._renders

    def _publish_count(self) -> None:
        """Writes this worker's count to its slot (under `_lock`)."""
        if self._shared is not None:
            COUNT.pack_into(self._shared, self._slot, self._renders)


RENDERS = Activity()
"""This process's renders, passes and requests: one for every engine and door, since they
share the cores."""
