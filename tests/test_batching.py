"""edge/synth/batching.py: the pure plan (which jobs run now, or until when to wait) on a
hand-moved clock, then the batch thread: windows, full batches, keys, fail-alone and
split-on-OOM, with a plain Python runner (the torch engine's own tests run the model)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from nearvoice.edge.synth.batching import (
    Batcher,
    BatchFailed,
    BatchSettings,
    Dispatch,
    Job,
    plan,
)
from nearvoice.edge.synth.priority import Priority, RenderTicket

SETTINGS = BatchSettings(max_batch=4, window=0.005)


def job(key: str, at: float, payload: int = 0) -> Job[int, int]:
    return Job(key, payload, at)


def test_a_lone_job_waits_exactly_its_window() -> None:
    queue = [job("a", 10.0)]
    waiting = plan(queue, 10.001, SETTINGS)
    assert waiting.batch == () and waiting.wake == pytest.approx(10.005)
    ready = plan(queue, 10.005, SETTINGS)
    assert ready.batch == tuple(queue) and ready.reason == "window"


def test_a_full_batch_runs_at_once_without_waiting_for_the_window() -> None:
    queue = [job("a", 10.0, n) for n in range(5)]
    decision = plan(queue, 10.0, SETTINGS)
    assert [j.payload for j in decision.batch] == [0, 1, 2, 3] and decision.reason == "full"


def test_only_jobs_of_the_oldest_key_share_its_batch() -> None:
    queue = [job("a", 1.0, 0), job("b", 1.001, 1), job("a", 1.002, 2), job("b", 1.003, 3)]
    decision = plan(queue, 2.0, SETTINGS)
    assert [j.payload for j in decision.batch] == [0, 2]
    rest = [j for j in queue if j not in decision.batch]
    assert [j.payload for j in plan(rest, 2.0, SETTINGS).batch] == [1, 3]


def test_jobs_that_queued_behind_a_running_batch_run_as_soon_as_it_ends() -> None:
    # Their window passed while the model was busy: nothing more to wait for.
    queue = [job("a", 1.0, 0), job("a", 1.5, 1)]
    decision = plan(queue, 3.0, SETTINGS)
    assert len(decision.batch) == 2 and decision.reason == "window"


def test_a_players_job_runs_before_an_older_prefetch() -> None:
    prefetch = RenderTicket(Priority.PREFETCH)
    queue = [
        Job("a", 0, 1.0, ticket=prefetch),
        Job("b", 1, 1.1),
        Job("a", 2, 1.2),
        Job("b", 3, 1.3, ticket=prefetch),
    ]
    first = plan(queue, 5.0, SETTINGS)
    assert [j.payload for j in first.batch] == [1, 3]  # the player's key, player first
    prefetch.hurry()  # a player joined the prefetch's fill: it is as urgent now
    assert [j.payload for j in plan(queue, 5.0, SETTINGS).batch] == [0, 2]


def test_an_empty_queue_waits_for_the_next_job() -> None:
    assert plan([], 1.0, SETTINGS) == plan([], 1.0, SETTINGS)
    assert plan([], 1.0, SETTINGS).wake is None


class Runner:
    """Doubles each payload; payloads in `bad` make any batch holding them raise, and
    batches larger than `oom_above` raise MemoryError, as a GPU out of memory would."""

    def __init__(self, bad: frozenset[int] = frozenset(), oom_above: int = 1 << 30) -> None:
        self.bad = bad
        self.oom_above = oom_above
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payloads: list[int]) -> list[int]:
        self.gate.wait(10)
        self.batches.append(list(payloads))
        if len(payloads) > self.oom_above:
            raise MemoryError("out of memory")
        if self.bad & set(payloads):
            raise ValueError("cannot say that")
        return [2 * p for p in payloads]


class Seen(list[Dispatch]):
    """The batches a batcher started, and an event set by the first."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def __call__(self, dispatch: Dispatch) -> None:
        self.append(dispatch)
        self.started.set()

    def first(self) -> None:
        assert self.started.wait(10), "no batch started"


def collect(batcher: Batcher[int, int]) -> Seen:
    seen = Seen()
    batcher.listeners.append(seen)
    return seen


def results(futures: list[Future[int]]) -> list[int | str]:
    out: list[int | str] = []
    for future in futures:
        try:
            out.append(future.result(10))
        except BatchFailed as exc:
            out.append(f"failed: {exc}")
    return out


def test_a_lone_request_runs_when_its_window_ends() -> None:
    runner = Runner()
    batcher: Batcher[int, int] = Batcher(runner, BatchSettings(8, 0.02))
    seen = collect(batcher)
    try:
        assert batcher.submit("a", 21).result(10) == 42
    finally:
        batcher.close()
    (dispatch,) = seen
    # It ran because its window ended, not later than that deadline's wake-up: the
    # batcher's own clock readings, not a sleep in the test.
    assert dispatch.reason == "window" and dispatch.size == 1
    assert dispatch.waits[0] >= 0.02
    assert batcher.clock() >= dispatch.deadline


def test_requests_within_the_window_run_as_one_batch() -> None:
    runner = Runner()
    runner.gate.clear()  # hold the first batch so that the rest queue behind it
    batcher: Batcher[int, int] = Batcher(runner, BatchSettings(4, 0.0))
    seen = collect(batcher)
    try:
        first = batcher.submit("a", 0)
        seen.first()  # the first batch has started (the gate holds it)
        rest = [batcher.submit("a", n) for n in range(1, 6)]
        runner.gate.set()
        assert results([first, *rest]) == [0, 2, 4, 6, 8, 10]
    finally:
        batcher.close()
    assert [d.size for d in seen] == [1, 4, 1]
    assert [d.reason for d in seen] == ["window", "full", "window"]


def test_an_utterance_that_fails_fails_alone() -> None:
    runner = Runner(bad=frozenset({3}))
    runner.gate.clear()
    batcher: Batcher[int, int] = Batcher(runner, BatchSettings(4, 0.0))
    seen = collect(batcher)
    try:
        blocker = batcher.submit("a", 100)
        seen.first()
        futures = [batcher.submit("a", n) for n in (1, 2, 3, 4)]
        runner.gate.set()
        out = results([blocker, *futures])
    finally:
        batcher.close()
    assert out[:3] == [200, 2, 4] and out[4] == 8
    assert str(out[3]).startswith("failed: ValueError: cannot say that")
    # The batch of four failed, its halves were retried, and the half holding the bad
    # utterance was split again: only that utterance failed.
    assert runner.batches[1:] == [[1, 2, 3, 4], [1, 2], [3, 4], [3], [4]]
    assert [d.reason for d in seen[1:]] == ["full", "retry", "retry", "retry", "retry"]


def test_a_batch_out_of_memory_is_split_and_retried() -> None:
    released = threading.Event()
    runner = Runner(oom_above=2)
    runner.gate.clear()
    batcher: Batcher[int, int] = Batcher(
        runner,
        BatchSettings(8, 0.0),
        is_oom=lambda exc: isinstance(exc, MemoryError),
        release=released.set,
    )
    seen = collect(batcher)
    try:
        blocker = batcher.submit("a", 0)
        seen.first()
        futures = [batcher.submit("a", n) for n in range(1, 6)]
        runner.gate.set()
        assert results([blocker, *futures]) == [0, 2, 4, 6, 8, 10]
    finally:
        batcher.close()
    assert released.is_set()
    assert runner.batches[1:] == [[1, 2, 3, 4, 5], [1, 2], [3, 4, 5], [3], [4, 5]]


def test_the_wait_estimate_counts_the_batches_ahead() -> None:
    runner = Runner()
    runner.gate.clear()
    batcher: Batcher[int, int] = Batcher(runner, BatchSettings(2, 0.01))
    seen = collect(batcher)
    try:
        assert batcher.estimated_wait() == pytest.approx(0.01)  # idle: just the window
        futures = [batcher.submit("a", 0)]
        seen.first()
        futures += [batcher.submit("a", n) for n in range(1, 5)]
        # One running, four queued (two batches): a fifth would run in the third batch.
        assert batcher.estimated_wait() == pytest.approx(2.5 * batcher.mean_seconds)
        runner.gate.set()
        results(futures)
    finally:
        batcher.close()


def test_a_closed_batcher_refuses_jobs_and_cancels_those_queued() -> None:
    runner = Runner()
    runner.gate.clear()
    batcher: Batcher[int, int] = Batcher(runner, BatchSettings(1, 0.0))
    seen = collect(batcher)
    running = batcher.submit("a", 1)
    seen.first()
    queued = batcher.submit("a", 2)
    batcher.close()
    runner.gate.set()
    assert queued.cancelled()
    assert running.result(10) == 2
    with pytest.raises(RuntimeError):
        batcher.submit("a", 3)
