"""How many renders and duration passes this process has in flight, so a render can tell
whether it is alone.

A render's first piece (the duration pass of its first chunk, then its first window) runs
on two onnxruntime threads. Sessions whose threads sleep between operators pay a wake-up
for each operator they share out, a few hundred of them in a first piece; sessions whose
threads spin pay none, but take a core from whatever else runs beside them for as long as
the piece lasts. Measured on piper's `joe` (20 first pieces x 4, p50): 29.9 ms to the
first window sleeping, 26.9 spinning, alone; beside another render, spinning lost far more
than it gained (68.6 ms against 46.6, and the other render slowed too). So a first piece
spins only when it is the node's one render (edge.synth.durations.Durations.spinning),
which is the common case at a quiet node and the case whose first byte a listener waits
for with nothing else to blame.

The renderer (edge.synth.renderer) counts a render from the moment it is queued to its
end, and its duration pass from the moment it is submitted to its end: a WAV miss's pass
counts the whole text beside the first piece (the header states the length), so that
first piece does not spin; a PCM miss's pass starts once its first chunk has left, so
that one does. The workers of a node (`--workers N`) share its cores, so each keeps its
count in its own slot of a file that all of them map (`Activity.share`, set up by
edge.node), and a render is alone only when every slot but its own worker's is 0.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path

SLOT = struct.Struct("<q")
"""One worker's count in the shared file: written only by that worker, under its lock;
read by the others without one (a count is small, and a read that races a write sees
the count before or after it, either of which is a count that was true)."""


class Activity:
    """A count of renders and passes in flight, this process's and (once `share`d) its
    sibling workers'."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._renders = 0
        self._shared: mmap.mmap | None = None
        self._slot = 0

    def share(self, path: Path, index: int, workers: int) -> None:
        """Keeps this worker's count in slot `index` of `path`, a file of `workers` slots
        that every worker of the node maps. A worker that dies with renders in flight
        leaves its count behind until it is restarted and shares again (siblings stay
        on the sleeping sessions meanwhile: the safe side)."""
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
            self._shared, self._slot = shared, index * SLOT.size
            SLOT.pack_into(shared, self._slot, self._renders)

    def started(self) -> None:
        """One more render or pass in flight; each is `ended` once, whatever becomes of
        it."""
        with self._lock:
            self._renders += 1
            if self._shared is not None:
                SLOT.pack_into(self._shared, self._slot, self._renders)

    def ended(self) -> None:
        with self._lock:
            self._renders -= 1
            if self._shared is not None:
                SLOT.pack_into(self._shared, self._slot, self._renders)

    def alone(self) -> bool:
        """Whether at most one render or pass (the caller's own render) is in flight, in
        this process and its sibling workers together."""
        if self._renders > 1:
            return False
        shared = self._shared
        if shared is None:
            return True
        others: int = sum(
            SLOT.unpack_from(shared, offset)[0]
            for offset in range(0, len(shared), SLOT.size)
            if offset != self._slot
        )
        return self._renders + others <= 1

    @property
    def renders(self) -> int:
        return self._renders


RENDERS = Activity()
"""This process's renders and passes: one count for every engine, since they share the
cores."""
