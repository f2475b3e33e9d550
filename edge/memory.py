"""A node's memory budget, and the allocator setting that lets it hold.

Measured on one edge process under a storm of distinct cold misses (400 misses of 15-40
words, 32 at a time, hibari on 2 cores, default settings): resident memory went from about
330 MB to about 740 MB and stayed there. It went to three places:

* the hot tier: every new object up to `[hot] max_object_bytes` enters it on commit, up to
  `[hot] memory_budget` (256 MiB by default) — memory by design, but a budget to size;
* the bodies of fills: running ones, and completed ones lingering a few seconds to be
  joined; a storm keeps as many as its concurrency in memory, unbounded until now
  (`fill_budget` bounds them: past it, completed fills are let go early and new misses are
  answered 503 `memory_budget`, or with a stale copy);
* the C allocator: glibc raises its mmap threshold each time a large block is freed, after
  which large blocks (numpy's audio buffers, the encoders' output) come from the heap and
  freed ones stay resident as fragmentation. A fixed `mmap_threshold` keeps large blocks
  mapped, so they return to the system when freed.

Python's own allocations (tracemalloc, same storm, hot tier held to 16 MiB) grew by about
25 MB, the hot tier and the fills; onnxruntime's CPU arena, when turned off, saved about
20 MB. With a 16 MiB hot tier the storm took an edge from 330 to 580 MB, and with the fixed
threshold as well from 285 to 430 MB. With every default (256 MiB hot tier) it now goes
from 300 to 640 MB: the rest is the hot tier filling, which its budget bounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

from nearvoice.edge.checks import at_least

log = logging.getLogger("nearvoice.memory")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


@dataclass(frozen=True, slots=True)
class MemorySettings:
    fill_budget: int = 128 * 1024**2
    """Bytes of object bodies held by fills (misses being produced, and completed ones
    still joinable). Past it, completed fills are let go at once and a new miss is
    answered 503 `memory_budget` (or with a stale copy) until fills finish."""
    mmap_threshold: int = 128 * 1024
    """Bytes from which the C allocator maps each block on its own, so that freeing it
    returns the memory to the system; 0 leaves the allocator's adaptive default."""

    def validate(self) -> None:
        at_least(self, "fill_budget", 1024**2)
        at_least(self, "mmap_threshold", 0)


def apply_allocator_settings(settings: MemorySettings) -> bool:
    """Fixes glibc's mmap threshold (which also stops it adapting); call at process
    start, before threads allocate. False where the C library is not glibc."""
    if settings.mmap_threshold == 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, settings.mmap_threshold))
    if not done:
        log.warning("could not set the allocator's mmap threshold")
    return done
