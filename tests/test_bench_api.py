"""bench/api.py's pure parts: the stall measure (how long played audio runs dry between
arrivals) and the alternation of the two doors it compares."""

from __future__ import annotations

import pytest

from nearvoice.bench.api import alternate, longest_dry

RATE = 1000.0  # bytes per second: 1000 bytes are one second of audio


def test_audio_that_arrives_ahead_of_playback_never_runs_dry() -> None:
    # One second at once, then a second more after half a second: 0.5 s to spare.
    assert longest_dry([(10.0, 1000), (10.5, 1000), (11.2, 500)], RATE) == 0.0
    assert longest_dry([], RATE) == 0.0
    assert longest_dry([(3.0, 10)], RATE) == 0.0


def test_a_late_arrival_is_the_time_past_the_end_of_what_had_come() -> None:
    # 0.2 s of audio, nothing until 0.5 s (dry for 0.3 s), 0.1 s more, nothing until
    # 0.9 s (dry for 0.6 s): the longest is the second.
    arrivals = [(0.0, 200), (0.5, 100), (0.9, 1000)]
    assert longest_dry(arrivals, RATE) == pytest.approx(0.6)  # 0.9 - (200 + 100) / 1000
    assert longest_dry(arrivals[:2], RATE) == pytest.approx(0.3)


async def test_alternate_takes_turns_going_first_and_keeps_each_doors_timings() -> None:
    calls: list[tuple[str, str]] = []

    def door(name: str):  # type: ignore[no-untyped-def]
        async def timed(item: str) -> float:
            calls.append((name, item))
            return float(len(calls))

        return timed

    a, b = await alternate(["x", "y", "z"], door("a"), door("b"), 0.0)
    assert calls == [("a", "x"), ("b", "x"), ("b", "y"), ("a", "y"), ("a", "z"), ("b", "z")]
    assert a == [1.0, 4.0, 5.0] and b == [2.0, 3.0, 6.0]
