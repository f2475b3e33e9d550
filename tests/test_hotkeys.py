"""edge/cache/hotkeys.py: the Space-Saving top-K counter."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nearvoice.edge.cache.hotkeys import HotKey, SpaceSaving


def test_capacity_below_one_is_rejected() -> None:
    with pytest.raises(ValueError):
        SpaceSaving(0)


def test_counts_are_exact_under_capacity() -> None:
    ss = SpaceSaving(10)
    for key, n in {"a": 5, "b": 3, "c": 1}.items():
        for _ in range(n):
            ss.add(key)
    assert {h.key: (h.hits, h.error) for h in ss.top(10)} == {
        "a": (5, 0),
        "b": (3, 0),
        "c": (1, 0),
    }


def test_top_is_ordered_by_hits_descending() -> None:
    ss = SpaceSaving(10)
    for key, n in [("low", 1), ("high", 9), ("mid", 4)]:
        for _ in range(n):
            ss.add(key)
    assert [h.key for h in ss.top(3)] == ["high", "mid", "low"]


def test_top_k_returns_only_k() -> None:
    ss = SpaceSaving(10)
    for i in range(6):
        for _ in range(i + 1):
            ss.add(f"k{i}")
    assert ss.top(2) == [HotKey("k5", 6, 0), HotKey("k4", 5, 0)]


def test_heavy_hitter_survives_many_distinct_keys() -> None:
    capacity = 10
    ss = SpaceSaving(capacity)
    stream = [f"cold{i}" for i in range(2000)]
    # "hot" gets far more than N/capacity of the hits, spread through the stream.
    stream += ["hot"] * 400
    random.Random(7).shuffle(stream)
    assert stream.count("hot") > len(stream) / capacity
    for key in stream:
        ss.add(key)
    assert ss.top(1)[0].key == "hot"


def test_every_key_above_n_over_capacity_is_present() -> None:
    capacity = 20
    rng = random.Random(11)
    stream = [f"k{rng.randrange(5000)}" for _ in range(5000)]
    stream += ["h1"] * 600 + ["h2"] * 450 + ["h3"] * 350
    rng.shuffle(stream)
    ss = SpaceSaving(capacity)
    for key in stream:
        ss.add(key)
    present = {h.key for h in ss.top(capacity)}
    truth = Counter(stream)
    heavy = {key for key, n in truth.items() if n > len(stream) / capacity}
    assert heavy == {"h1", "h2", "h3"}
    assert heavy <= present


def test_error_bound_brackets_the_true_count() -> None:
    capacity = 16
    rng = random.Random(3)
    # A skewed (Zipf-like) stream over many keys.
    keys = [f"k{i}" for i in range(500)]
    weights = [1 / (i + 1) for i in range(500)]
    stream = rng.choices(keys, weights, k=20_000)
    ss = SpaceSaving(capacity)
    for key in stream:
        ss.add(key)
    truth = Counter(stream)
    reported = ss.top(capacity)
    assert len(reported) == capacity
    for hot in reported:
        assert hot.hits - hot.error <= truth[hot.key] <= hot.hits


def test_replacement_inherits_the_minimum_count_as_error() -> None:
    ss = SpaceSaving(2)
    for key in ["a", "a", "a", "b", "b", "c"]:
        ss.add(key)
    assert {h.key: (h.hits, h.error) for h in ss.top(2)} == {"a": (3, 0), "c": (3, 2)}


def test_counts_sum_to_the_stream_length() -> None:
    ss = SpaceSaving(8)
    rng = random.Random(5)
    stream = [f"k{rng.randrange(100)}" for _ in range(3000)]
    for key in stream:
        ss.add(key)
    assert sum(h.hits for h in ss.top(8)) == len(stream)


def test_discard_forgets_a_key() -> None:
    ss = SpaceSaving(4)
    for key in ["a", "a", "b"]:
        ss.add(key)
    ss.discard("a")
    assert [h.key for h in ss.top(4)] == ["b"]
    assert len(ss) == 1


def test_discard_of_an_unknown_key_is_a_no_op() -> None:
    ss = SpaceSaving(4)
    ss.add("a")
    ss.discard("zzz")
    assert ss.top(4) == [HotKey("a", 1, 0)]


def test_discarded_key_counts_from_scratch_when_seen_again() -> None:
    ss = SpaceSaving(4)
    for _ in range(5):
        ss.add("a")
    ss.discard("a")
    ss.add("a")
    assert ss.top(1) == [HotKey("a", 1, 0)]


def test_counter_keeps_working_after_discards_when_full() -> None:
    ss = SpaceSaving(3)
    for key in ["a", "b", "c"]:
        ss.add(key)
    ss.discard("b")
    for key in ["d", "e", "f", "g"]:
        ss.add(key)
    assert len(ss) == 3
    assert sum(h.hits for h in ss.top(3)) <= 7


def test_memory_is_bounded_by_capacity() -> None:
    ss = SpaceSaving(50)
    for i in range(10_000):
        ss.add(f"key{i}")
    assert len(ss) == 50
    assert len(ss.top(1000)) == 50
    assert len(ss._heap) <= 2 * 50
