"""How many renders and duration passes this process has in flight, so a render can tell
whether it is alone.

A render's first piece (the duration pass of its first chunk, then its first window) runs
on two onnxruntime threads. Sessions whose threads sleep between operators pay a wake-up
for each operator they share out, a few hundred of them in a first piece; sessions whose
threads spin pay none, but take a core from whatever else runs beside them for as long as
the piece lasts. Measured on piper's `joe` (20 first pieces x 4, p50): 29.9 ms to the
first window sleeping, 26.9 spinning, alone; beside another render, spinning lost far more
than it gained (68.6 ms against 46.6, and the other render slowed too). So a first piece
spins only when it is the process's one render (edge.synth.durations.Durations.spinning),
which is the common case at a quiet node and the case whose first byte a listener waits
for with nothing else to blame.

The renderer (edge.synth.renderer) counts a render from the moment it is queued to its
end, and its duration pass from the moment it is submitted to its end: a WAV miss's pass
counts the whole text beside the first piece (the header states the length), so that
first piece does not spin; a PCM miss's pass starts once its first chunk has left, so
that one does. Renders in sibling worker processes (`--workers`) are not seen: each
process decides for itself.
"""

from __future__ import annotations

import threading


class Activity:
    """A count of renders and passes in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._renders = 0

    def started(self) -> None:
        """One more render or pass in flight; each is `ended` once, whatever becomes of
        it."""
        with self._lock:
            self._renders += 1

    def ended(self) -> None:
        with self._lock:
            self._renders -= 1

    def alone(self) -> bool:
        """Whether at most one render or pass (the caller's own render) is in flight."""
        return self._renders <= 1

    @property
    def renders(self) -> int:
        return self._renders


RENDERS = Activity()
"""This process's renders and passes: one count for every engine, since they share the
cores."""
