"""Render starts shared between realtime sessions, round robin.

A session that receives a long text at once completes many segments together; if each
started its fill at once, its renders would fill the engines' queue and every other
session would wait behind them. Instead a segment that would start a render first takes a
turn: at most `slots` segments (of all sessions) render at once, and a freed slot goes to
the next session in rotation that has a segment waiting, so sessions take turns segment by
segment whatever each has queued (as a scheduler's round robin between run queues): the
owner served longest ago goes first, a turn taken at once counting like any other.

A waiting segment that is cancelled leaves the queue; a turn is given back exactly once
(`Turn.release`), when its render ends, so a failed or abandoned render frees its slot.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable


class Turn:
    """A slot held by one segment; `release` gives it back (idempotent)."""

    __slots__ = ("_turns", "released")

    def __init__(self, turns: Turns) -> None:
        self._turns = turns
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._turns._free()


class Turns:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.busy = 0
        self._queues: dict[Hashable, deque[asyncio.Future[Turn]]] = {}
        """Owners with segments waiting."""
        self._served: OrderedDict[Hashable, None] = OrderedDict()
        """Owners by when they last had a turn, longest ago first."""

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def take(self, owner: Hashable) -> Turn:
        """A turn for one of `owner`'s segments, once a slot is free and every other
        owner waiting before it has had its turn."""
        if self.busy < self.slots and not self._queues:
            self.busy += 1
            self._mark(owner)
            return Turn(self)
        future: asyncio.Future[Turn] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(owner, deque()).append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.result().release()  # granted just as it was cancelled: give it back
            else:
                self._discard(owner, future)
            raise

    def _discard(self, owner: Hashable, future: asyncio.Future[Turn]) -> None:
        queue = self._queues.get(owner)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._queues[owner]

    def forget(self, owner: Hashable) -> None:
        """The owner is gone (its session ended)."""
        self._served.pop(owner, None)

    def _mark(self, owner: Hashable) -> None:
        self._served.pop(owner, None)
        self._served[owner] = None

    def _next_owner(self) -> Hashable:
        never = [owner for owner in self._queues if owner not in self._served]
        if never:
            return never[0]
        return next(owner for owner in self._served if owner in self._queues)

    def _free(self) -> None:
        self.busy -= 1
        while self.busy < self.slots and self._queues:
            owner = self._next_owner()
            queue = self._queues[owner]
            future = queue.popleft()
            if not queue:
                del self._queues[owner]
            if future.cancelled():
                continue
            self.busy += 1
            self._mark(owner)
            future.set_result(Turn(self))
