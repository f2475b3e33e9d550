"""edge.synth.runs: pieces made once, each counted once by whichever thread claims it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.edge.synth.runs import Runs, Table


def made(log: list[str], count: int) -> Iterator[str]:
    for i in range(count):
        log.append(f"made {i}")
        yield f"piece {i}"


def test_pieces_are_made_lazily_once_in_order() -> None:
    log: list[str] = []
    runs: Runs[str, int] = Runs(made(log, 3))
    assert runs.piece(0) == "piece 0" and log == ["made 0"]
    assert runs.piece(0) == "piece 0" and log == ["made 0"]
    assert runs.pieces() == ["piece 0", "piece 1", "piece 2"]
    assert runs.piece(3) is None and list(runs) == runs.pieces()
    assert log == ["made 0", "made 1", "made 2"]


def test_a_piece_claimed_by_one_thread_is_waited_for_by_the_other() -> None:
    runs: Runs[str, str] = Runs(made([], 2))
    counting = threading.Event()
    finish = threading.Event()

    def slow() -> str:
        counting.set()
        finish.wait(10)
        return "counted by the pass"

    with ThreadPoolExecutor(2) as pool:
        claimed = pool.submit(runs.run, 0, slow)
        counting.wait(10)  # the pass holds piece 0 now
        waiting = pool.submit(runs.run, 0, lambda: "counted again")
        assert not waiting.done()
        finish.set()
        assert claimed.result(10) == waiting.result(10) == "counted by the pass"


def test_a_failure_reaches_every_thread_that_waits_for_the_piece() -> None:
    runs: Runs[str, int] = Runs(made([], 1))
    started, fail = threading.Event(), threading.Event()

    def broken() -> int:
        started.set()
        fail.wait(10)
        raise ValueError("no session")

    with ThreadPoolExecutor(2) as pool:
        claimed = pool.submit(runs.run, 0, broken)
        started.wait(10)
        waiting = pool.submit(runs.run, 0, lambda: 1)
        fail.set()
        with pytest.raises(ValueError, match="no session"):
            claimed.result(10)
        with pytest.raises(RuntimeError, match="piece 0") as caught:
            waiting.result(10)
        assert isinstance(caught.value.__cause__, ValueError)


def test_the_table_keeps_the_last_values_for_every_thread() -> None:
    table: Table[str, list[str]] = Table(size=2)
    first = table.get("a", lambda: ["a"])
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(table.get, "a", lambda: ["other"]).result() is first
    table.get("b", lambda: ["b"])
    table.get("a", lambda: ["again"])  # a is the most recent now
    table.get("c", lambda: ["c"])  # b goes
    assert table.get("b", lambda: ["new b"]) == ["new b"]
    assert table.get("c", lambda: ["x"]) == ["c"]


def test_a_pass_beside_a_render_counts_each_piece_once() -> None:
    engine = PiperEngine()
    engine.warmup()
    durations = engine._durations["joe"]
    calls: list[int] = []
    count = durations.count

    def counting(feeds, first=False, spin=False):  # type: ignore[no-untyped-def]
        calls.append(int(feeds["input"].shape[1]))
        return count(feeds, first, spin)

    durations.count = counting  # type: ignore[method-assign]
    text = "Your order has shipped. Please hold for the next agent. The meeting moved to three."
    with ThreadPoolExecutor(1) as passes:
        counted = passes.submit(engine.samples, text, "joe", 1.0)
        audio = list(engine.stream(text, "joe", 1.0, 0))
        total = counted.result(60)
    assert total == sum(map(len, audio))
    assert len(calls) == 3 == len(set(calls))  # three pieces, each counted once
    again = PiperEngine()
    assert b"".join(a.tobytes() for a in again.stream(text, "joe", 1.0, 0)) == b"".join(
        a.tobytes() for a in audio
    )


def test_claim_counts_an_unclaimed_piece_and_skips_a_claimed_one_without_waiting() -> None:
    runs: Runs[str, str] = Runs(made([], 2))
    counting, finish = threading.Event(), threading.Event()

    def slow() -> str:
        counting.set()
        finish.wait(10)
        return "by the pass"

    with ThreadPoolExecutor(2) as pool:
        claimed = pool.submit(runs.run, 1, slow)
        counting.wait(10)
        # Piece 1 is being counted: claim returns at once; piece 0 is counted here.
        helper = pool.submit(
            lambda: [runs.claim(i, lambda i=i: f"by the render {i}") for i in (0, 1)]
        )
        assert helper.result(10) == [True, False]
        assert not claimed.done()
        finish.set()
        assert claimed.result(10) == "by the pass"
    assert runs.run(0, lambda: "again") == "by the render 0"
    assert not runs.claim(0, lambda: "again")


def test_a_render_waiting_for_the_length_counts_what_the_pass_has_not_reached() -> None:
    """help_count counts, first to last, the pieces nobody has claimed, and does not wait
    for the one the pass is counting; the pass then finds the rest counted."""
    engine = PiperEngine()
    engine.warmup()
    durations = engine._durations["joe"]
    count = durations.count
    counted_by: list[str] = []
    held, release = threading.Event(), threading.Event()

    def counting(feeds):  # type: ignore[no-untyped-def]
        name = threading.current_thread().name
        counted_by.append(name.split("_")[0])
        if name.startswith("pass"):
            held.set()
            release.wait(10)
        return count(feeds)

    durations.count = counting  # type: ignore[method-assign]
    text = (
        "Your order has shipped. Please hold for the next agent. "
        "The meeting moved to three. Bring the blue folder."
    )
    with (
        ThreadPoolExecutor(1, thread_name_prefix="pass") as passes,
        ThreadPoolExecutor(1, thread_name_prefix="render") as renders,
    ):
        counted = passes.submit(engine.samples, text, "joe", 1.0)
        held.wait(10)  # the pass holds the last piece
        renders.submit(engine.help_count, text, "joe", 1.0).result(10)  # never waits for it
        assert counted_by == ["pass", "render", "render", "render"]
        release.set()
        total = counted.result(60)
        audio = list(engine.stream(text, "joe", 1.0, 0))
    assert len(counted_by) == 4  # the render found every piece counted
    assert total == sum(map(len, audio))
    fresh = PiperEngine()
    assert b"".join(a.tobytes() for a in fresh.stream(text, "joe", 1.0, 0)) == b"".join(
        a.tobytes() for a in audio
    )
