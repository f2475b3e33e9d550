"""Top-K most requested keys in bounded memory: the Space-Saving algorithm
(Metwally, Agrawal and El Abbadi, 2005).

At most `capacity` counters exist. A new key, when all are taken, replaces the smallest
counter and inherits its count as an error bound, so every reported count over-estimates
the truth by at most `error`, and any key with more than N/capacity hits is guaranteed to
be present.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HotKey:
    key: str
    hits: int
    error: int
    """Upper bound on how much `hits` over-counts."""


class SpaceSaving:
    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._counts: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        # Min-heap of (count, key) with lazy updates: counts only grow, so an entry whose
        # count is below the key's current count is stale and is refreshed when popped.
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, key: str) -> None:
        counts = self._counts
        if key in counts:
            counts[key] += 1
            return
        if len(counts) < self.capacity:
            counts[key] = 1
            self._errors[key] = 0
            heapq.heappush(self._heap, (1, key))
            return
        floor, victim = self._pop_min()
        del counts[victim]
        del self._errors[victim]
        counts[key] = floor + 1
        self._errors[key] = floor
        heapq.heappush(self._heap, (floor + 1, key))

    def _pop_min(self) -> tuple[int, str]:
        while True:
            count, key = heapq.heappop(self._heap)
            current = self._counts.get(key)
            if current == count:
                return count, key
            if current is not None:
                heapq.heappush(self._heap, (current, key))

    def discard(self, key: str) -> None:
        """Forgets a key (after a purge); its heap entry is dropped lazily."""
        self._counts.pop(key, None)
        self._errors.pop(key, None)

    def top(self, k: int) -> list[HotKey]:
        best = heapq.nlargest(k, self._counts.items(), key=lambda item: item[1])
        return [HotKey(key, hits, self._errors[key]) for key, hits in best]
