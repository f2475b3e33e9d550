"""One text's pieces and their duration-pass runs, shared by the threads that need them.

A sized render runs on two threads at once (edge.synth.renderer): the duration pass counts
every piece of the text, to announce the object's length, while the render thread renders
the first piece, which needs that piece's count too (the rest of a split graph starts from
what the pass hands off, edge.synth.durations). Without sharing, both threads would
phonemize the text and run the pass over the same pieces, and the length would wait for
the pass thread to count the first piece the render thread had already counted.

So a text's `Runs` is shared: the pieces are made once, lazily, in order, and each piece
is counted once, by whichever thread claims it first; a thread that needs a piece another
thread is counting waits for it. The pass claims from the last piece back and the render
from the first forward, so at concurrency one the two meet in the middle and the length is
known after about half the pass. Once its first audio is out, a render waiting for the
length helps the pass (`claim`): it counts, first to last, every piece no thread has
claimed yet, and skips, without waiting, those another thread is counting. `Table` keeps the last
few texts' Runs, so the pass and the render find the same one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Runs(Generic[P, R]):
    """A text's pieces (made from `pieces` on first need) and a run of each."""

    def __init__(self, pieces: Iterator[P]) -> None:
        self._source: Iterator[P] | None = pieces
        self._pieces: list[P] = []
        self._lock = threading.Lock()
        self._claimed: set[int] = set()
        self._done: dict[int, threading.Event] = {}
        self._runs: dict[int, R] = {}
        self._failed: dict[int, BaseException] = {}

    def piece(self, index: int) -> P | None:
        """The piece at `index`, None past the last."""
        with self._lock:
            while len(self._pieces) <= index and self._source is not None:
                made = next(self._source, None)
                if made is None:
                    self._source = None
                else:
                    self._pieces.append(made)
            return self._pieces[index] if index < len(self._pieces) else None

    def pieces(self) -> list[P]:
        """Every piece (makes the rest)."""
        index = 0
        while self.piece(index) is not None:
            index += 1
        return list(self._pieces)

    def __iter__(self) -> Iterator[P]:
        index = 0
        while (piece := self.piece(index)) is not None:
            yield piece
            index += 1

    def run(self, index: int, compute: Callable[[], R]) -> R:
        """The run of piece `index`: computed here with `compute` if no thread claimed it
        yet, else the claiming thread's (waited for). An exception in `compute` is
        raised here and in every thread that waits for that piece."""
        with self._lock:
            mine = index not in self._claimed
            self._claimed.add(index)
            done = self._done.setdefault(index, threading.Event())
        if mine:
            try:
                self._runs[index] = compute()
            except BaseException as exc:
                self._failed[index] = exc
                raise
            finally:
                done.set()
            return self._runs[index]
        return self._wait(index, done)

    def claim(self, index: int, compute: Callable[[], R]) -> bool:
        """Computes the run of piece `index` here if no thread has claimed it yet (True);
        False at once, without waiting, if one has."""
        with self._lock:
            if index in self._claimed:
                return False
        self.run(index, compute)  # (claimed meanwhile by another thread: waits for that)
        return True

    def _wait(self, index: int, done: threading.Event) -> R:
        done.wait()
        failed = self._failed.get(index)
        if failed is not None:
            raise RuntimeError(f"counting piece {index} failed in another thread") from failed
        return self._runs[index]


class Table(Generic[K, V]):
    """The last `size` values by key, shared by every thread."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value of `key`, made (cheaply, under the lock) if absent."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                value = self._entries[key] = make()
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
            return value
