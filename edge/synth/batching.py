"""Dynamic batching: renders for one voice that arrive within a short window run as one
batch on the accelerator, up to a maximum batch size.

A GPU renders a batch of 32 utterances in about twice the time of one (on an H200 with an
MMS-size VITS: 43 ms at batch 1, 95 ms at batch 32), so under concurrent misses it pays to
wait a few milliseconds for company. On the CPU it does not (the cores are already busy
with one utterance), which is why the window and the maximum are settings per device.

The core is pure: `plan` looks at the queue and the clock and says which jobs run now, or
until when to wait, so the rules are tested without threads or sleeps:

* jobs that share a batch have the same `key` (the engine's fixed shape, e.g. the text
  length bucket): the most urgent queued job (a player's before a prefetch's, as in
  edge.synth.priority; then the oldest) decides which key runs next, and its batch-mates
  are taken in the same order;
* a batch runs as soon as it is full, or once its oldest job has waited `window`
  seconds, so a lone request never waits longer than the window for company (it may wait
  for the batch running before it: that is queueing, not the window);
* jobs that arrived while a batch was running and have waited their window run at once.

`Batcher` drives the core on one thread of its own, the only one that touches the model
(one batch at a time, as one GPU stream runs them). Failures stay with their utterance: a
batch that raises is split in halves and each half retried, down to the single job that
fails alone, so its batch-mates get their audio. Out-of-memory is handled the same way,
after the accelerator's cache is emptied (`release`). The engine keeps the batch's shape
fixed, whatever its real size (edge.synth.torch_engine), so a retried half renders the
same bytes as the whole batch would have.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from nearvoice.edge.synth.priority import CURRENT, Priority, RenderTicket

log = logging.getLogger("nearvoice.batching")

P = TypeVar("P")
R = TypeVar("R")

EWMA_WEIGHT = 0.2
"""Weight of the newest batch's run time in the running mean admission reads."""
INITIAL_BATCH_SECONDS = 0.05
"""Assumed per batch until one has been measured."""


@dataclass(frozen=True, slots=True)
class BatchSettings:
    max_batch: int = 1
    """Most jobs in one batch; 1 means no batching (each job runs in its caller's thread)."""
    window: float = 0.0
    """Seconds the oldest queued job may wait for batch-mates before its batch runs."""

    @property
    def batching(self) -> bool:
        return self.max_batch > 1


@dataclass(eq=False, slots=True)
class Job(Generic[P, R]):
    key: Hashable
    """Jobs of one batch share it (the engine's shape for them)."""
    payload: P
    enqueued: float
    """Clock reading when the job was queued (`Batcher.clock`)."""
    future: Future[R] = field(default_factory=Future)
    seq: int = 0
    ticket: RenderTicket | None = None
    """The render's ticket (edge.synth.priority); None is a player's."""

    def rank(self) -> tuple[int, int]:
        priority = Priority.PLAYER if self.ticket is None else self.ticket.priority
        return int(priority), self.seq


@dataclass(frozen=True, slots=True)
class Decision(Generic[P, R]):
    batch: tuple[Job[P, R], ...] = ()
    """The jobs to run now, most urgent first (empty: nothing to run yet)."""
    wake: float | None = None
    """When nothing runs: the clock reading at which to plan again (None: on the next job)."""
    reason: str = ""
    """Why the batch runs now: "full" or "window"."""


def plan(queue: Sequence[Job[P, R]], now: float, settings: BatchSettings) -> Decision[P, R]:
    """Which queued jobs run now (pure: no clock, no threads). `queue` is in arrival
    order; ranks (priority, then arrival) may change while jobs wait."""
    if not queue:
        return Decision()
    ordered = sorted(queue, key=Job.rank)
    head = ordered[0]
    same = tuple(itertools.islice((j for j in ordered if j.key == head.key), settings.max_batch))
    if len(same) >= settings.max_batch:
        return Decision(same, reason="full")
    deadline = head.enqueued + settings.window
    if now >= deadline:
        return Decision(same, reason="window")
    return Decision(wake=deadline)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One batch as it started: what admission, metrics and tests read."""

    size: int
    """Jobs in it (its real utterances; padding is the engine's business)."""
    reason: str
    """"full", "window", or "retry" (a half of a batch that failed)."""
    waits: tuple[float, ...]
    """Seconds each job spent queued before this batch started."""
    deadline: float
    """When the batch's oldest job's window ended (`enqueued + window`)."""


class BatchFailed(Exception):
    """What a job's future raises when its utterance failed on its own."""


class Batcher(Generic[P, R]):
    """Queues jobs and runs them in batches on one thread: `run(payloads)` returns one
    result per payload, in order, or raises for the whole batch (then the batch is split
    and retried, so that only the jobs that fail on their own fail). `is_oom` tells an
    out-of-memory error apart, after which `release` frees what the accelerator caches
    before the halves run. `on_dispatch` sees every batch as it starts."""

    def __init__(
        self,
        run: Callable[[list[P]], list[R]],
        settings: BatchSettings,
        *,
        name: str = "batcher",
        is_oom: Callable[[BaseException], bool] = lambda exc: False,
        release: Callable[[], None] = lambda: None,
        on_dispatch: Callable[[Dispatch], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self.settings = settings
        self.clock = clock
        self._is_oom = is_oom
        self._release = release
        self.listeners: list[Callable[[Dispatch], None]] = [on_dispatch] if on_dispatch else []
        """Called on the batch thread with every batch as it starts (metrics, tests)."""
        self._queue: list[Job[P, R]] = []
        self._seq = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self._running = 0
        """Jobs in the batch running now."""
        self.mean_seconds = INITIAL_BATCH_SECONDS
        """Running mean of one batch's run time."""
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- callers --------------------------------------------------------------------------
    def submit(self, key: Hashable, payload: P) -> Future[R]:
        """Queues a job with the ticket of the render submitting it (`CURRENT`)."""
        job: Job[P, R] = Job(key, payload, self.clock(), ticket=CURRENT.get())
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            job.seq = next(self._seq)
            self._queue.append(job)
            self._ready.notify()
        return job.future

    def call(self, key: Hashable, payload: P) -> R:
        """Submits and waits (in a render thread) for this job's result."""
        return self.submit(key, payload).result()

    @property
    def queued(self) -> int:
        with self._ready:
            return len(self._queue)

    def estimated_wait(self) -> float:
        """Seconds until a job submitted now would start running: the window when the
        batcher is idle, else the batches ahead of it (the one running counts half: on
        average it is half done)."""
        with self._ready:
            queued, running = len(self._queue), self._running
        if not queued and not running:
            return self.settings.window
        ahead = -(-(queued + 1) // self.settings.max_batch) - 1
        return (ahead + (0.5 if running else 0.0)) * self.mean_seconds

    def close(self) -> None:
        with self._ready:
            self._closed = True
            pending, self._queue = self._queue, []
            self._ready.notify_all()
        for job in pending:
            job.future.cancel()

    # -- the batch thread -----------------------------------------------------------------
    def _next(self) -> Decision[P, R] | None:
        with self._ready:
            while True:
                if self._closed:
                    return None
                decision = plan(self._queue, self.clock(), self.settings)
                if decision.batch:
                    taken = {id(j) for j in decision.batch}
                    self._queue = [j for j in self._queue if id(j) not in taken]
                    self._running = len(decision.batch)
                    return decision
                timeout = None if decision.wake is None else max(0.0, decision.wake - self.clock())
                self._ready.wait(timeout)

    def _loop(self) -> None:
        while (decision := self._next()) is not None:
            jobs = [j for j in decision.batch if j.future.set_running_or_notify_cancel()]
            try:
                if jobs:
                    deadline = decision.batch[0].enqueued + self.settings.window
                    self._execute(jobs, decision.reason, deadline)
            except BaseException as exc:  # never leave a caller waiting
                log.exception("batch thread failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._ready:
                    self._running = 0

    def _execute(self, jobs: list[Job[P, R]], reason: str, deadline: float) -> None:
        started = self.clock()
        if self.listeners:
            waits = tuple(started - j.enqueued for j in jobs)
            dispatch = Dispatch(len(jobs), reason, waits, deadline)
            for listener in self.listeners:
                listener(dispatch)
        try:
            results = self._run([j.payload for j in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"{len(results)} results for a batch of {len(jobs)}")
        except Exception as exc:
            oom = self._is_oom(exc)
            if oom:
                self._release()
            if len(jobs) == 1:
                what = "out of memory" if oom else f"{type(exc).__name__}: {exc}"
                jobs[0].future.set_exception(BatchFailed(what))
                return
            log.warning(
                "a batch of %d failed (%s); retrying it in halves",
                len(jobs),
                "out of memory" if oom else type(exc).__name__,
            )
            half = len(jobs) // 2
            self._execute(jobs[:half], "retry", deadline)
            self._execute(jobs[half:], "retry", deadline)
            return
        elapsed = self.clock() - started
        self.mean_seconds += EWMA_WEIGHT * (elapsed - self.mean_seconds)
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)


def batcher_of(engine: object) -> Batcher[Any, Any] | None:
    """The batcher of an engine that batches (an attribute `batcher`), else None."""
    found = getattr(engine, "batcher", None)
    return found if isinstance(found, Batcher) else None


def describe(settings: BatchSettings) -> str:
    if not settings.batching:
        return "no batching"
    return f"batches of up to {settings.max_batch} within {settings.window * 1000:g} ms"
