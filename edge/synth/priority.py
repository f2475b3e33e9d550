"""Which queued render starts next: a player waiting on a miss before a prefetch.

Renders run on a fixed set of inference threads. `PriorityPool` is that set: an executor
whose queue hands the next free thread to the most urgent item (lowest `Priority`, then
first come), instead of the plain first-in-first-out of a ThreadPoolExecutor. So a
10,000-item prefetch never stands between a player and its audio.

An item's urgency is the `RenderTicket` of the fill it renders, read from the context when
the item is submitted (`CURRENT`; the node sets it on each fill's task). The ticket is
shared and mutable: when a player joins a fill that a prefetch started, the node hurries
its ticket and the queued render moves ahead at once.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Priority(IntEnum):
    PLAYER = 0
    """A request is waiting for these bytes."""
    PREFETCH = 1
    """Warming the cache: only when no player needs the thread."""


@dataclass(eq=False, slots=True)
class RenderTicket:
    priority: Priority = Priority.PLAYER

    def hurry(self) -> None:
        """A player now waits on this render."""
        self.priority = Priority.PLAYER


CURRENT: ContextVar[RenderTicket | None] = ContextVar("nearvoice_render_ticket", default=None)
"""The ticket of the fill whose task is running; None means a player's."""


@dataclass(eq=False, slots=True)
class _Item:
    ticket: RenderTicket | None
    seq: int
    future: Future[Any]
    call: Callable[[], Any]

    def rank(self) -> tuple[int, int]:
        priority = Priority.PLAYER if self.ticket is None else self.ticket.priority
        return int(priority), self.seq


class PriorityPool(Executor):
    """`workers` threads taking the most urgent queued item first. The queue is short
    (bounded by the renderer's admission), so picking is a scan, which lets a ticket's
    priority change while its item waits."""

    def __init__(self, workers: int, thread_name_prefix: str = "pool") -> None:
        self._queue: list[_Item] = []
        self._seq = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{thread_name_prefix}_{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Items waiting for a thread."""
        with self._ready:
            return len(self._queue)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        item = _Item(CURRENT.get(), 0, future, lambda: fn(*args, **kwargs))
        with self._ready:
            if self._closed:
                raise RuntimeError("cannot schedule new renders after shutdown")
            item.seq = next(self._seq)
            self._queue.append(item)
            self._ready.notify()
        return future

    def _next(self) -> _Item | None:
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return None
            item = min(self._queue, key=_Item.rank)
            self._queue.remove(item)
            return item

    def _work(self) -> None:
        while (item := self._next()) is not None:
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                result = item.call()
            except BaseException as exc:
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._ready:
            self._closed = True
            if cancel_futures:
                for item in self._queue:
                    item.future.cancel()
                self._queue.clear()
            self._ready.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()
