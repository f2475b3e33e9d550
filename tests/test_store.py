"""edge/cache/store.py: the disk tier on a real diskcache in tmp_path."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.cache.store import (
    STAGING_DIR,
    DiskStore,
    Outcome,
    StoreSettings,
    VerificationError,
)
from nearvoice.edge.policy import Policy

BIG_LIMIT = 1 << 30


def body_for(name: str, size: int = 4096) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def meta_for(name: str, body: bytes, **overrides: object) -> ObjectMeta:
    key = hashlib.sha256(name.encode()).hexdigest()
    fields: dict[str, object] = {
        "key": key,
        "content_type": "audio/ogg;codecs=opus",
        "length": len(body),
        "etag": etag_for(key),
        "sha256": hashlib.sha256(body).hexdigest(),
        "policy": Policy.PERSONAL,
        "stored_at": 1_700_000_000.25,
        "ttl": 3600,
    }
    fields.update(overrides)
    return ObjectMeta(**fields)  # type: ignore[arg-type]


def value_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*.val") if STAGING_DIR not in p.parts]


def staging_files(directory: Path) -> list[Path]:
    return list((directory / STAGING_DIR).iterdir())


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(directory: Path) -> Iterator[DiskStore]:
    s = DiskStore(directory, StoreSettings(size_limit=BIG_LIMIT))
    yield s
    s.close()


def read_fd(fd: int, size: int) -> bytes:
    try:
        return os.pread(fd, size + 1, 0)
    finally:
        os.close(fd)


# -- reads and writes ----------------------------------------------------------------------


def test_open_of_an_absent_key_is_a_miss(store: DiskStore) -> None:
    opened = store.open("0" * 64)
    assert opened.outcome is Outcome.MISS
    assert opened.meta is None
    assert opened.fd == -1


def test_put_then_open_small_object_returns_the_body_in_memory(store: DiskStore) -> None:
    body = body_for("a")
    meta = meta_for("a", body)
    store.put(meta, body)
    opened = store.open(meta.key, read_below=len(body))
    assert opened.outcome is Outcome.HIT
    assert opened.body == body
    assert opened.fd == -1


def test_put_then_open_large_object_returns_a_descriptor(store: DiskStore) -> None:
    body = body_for("a", 100_000)
    meta = meta_for("a", body)
    store.put(meta, body)
    opened = store.open(meta.key, read_below=0)
    assert opened.outcome is Outcome.HIT
    assert opened.body is None
    assert opened.fd >= 0
    assert read_fd(opened.fd, len(body)) == body


def test_descriptor_stays_readable_after_the_object_is_deleted(store: DiskStore) -> None:
    body = body_for("a", 50_000)
    meta = meta_for("a", body)
    store.put(meta, body)
    opened = store.open(meta.key)
    store.delete(meta.key)
    assert read_fd(opened.fd, len(body)) == body


def test_metadata_round_trips(store: DiskStore) -> None:
    body = body_for("a")
    meta = meta_for("a", body, policy=Policy.HOT, ttl=7 * 86400)
    store.put(meta, body)
    opened = store.open(meta.key, read_below=len(body))
    assert opened.meta == meta


def test_meta_tag_round_trips() -> None:
    meta = meta_for("a", b"abc", policy=Policy.DRAFT)
    again = ObjectMeta.from_tag(meta.to_tag())
    assert again == meta
    assert again.policy is Policy.DRAFT


def test_put_under_the_limit_evicts_nothing(store: DiskStore) -> None:
    body = body_for("a")
    assert store.put(meta_for("a", body), body) == 0


def test_objects_survive_a_restart(directory: Path) -> None:
    body = body_for("a", 20_000)
    meta = meta_for("a", body)
    first = DiskStore(directory, StoreSettings(size_limit=BIG_LIMIT))
    first.put(meta, body)
    first.close()
    second = DiskStore(directory, StoreSettings(size_limit=BIG_LIMIT))
    try:
        opened = second.open(meta.key)
        assert opened.outcome is Outcome.HIT
        assert opened.meta == meta
        assert read_fd(opened.fd, len(body)) == body
    finally:
        second.close()


def test_put_replaces_an_object_and_removes_the_old_file(store: DiskStore, directory: Path) -> None:
    old, new = body_for("old"), body_for("new", 5000)
    store.put(meta_for("a", old), old)
    store.put(meta_for("a", new), new)
    opened = store.open(meta_for("a", new).key, read_below=1 << 20)
    assert opened.body == new
    assert len(value_files(directory)) == 1


def test_every_body_is_a_file(store: DiskStore, directory: Path) -> None:
    body = b"x"
    store.put(meta_for("tiny", body), body)
    assert len(value_files(directory)) == 1


# -- verification --------------------------------------------------------------------------


def test_wrong_sha256_raises_and_stores_nothing(store: DiskStore, directory: Path) -> None:
    body = body_for("a")
    meta = meta_for("a", body, sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(VerificationError):
        store.put(meta, body)
    assert store.open(meta.key).outcome is Outcome.MISS
    assert not store.contains(meta.key)
    assert store.count() == 0
    assert value_files(directory) == []
    assert staging_files(directory) == []


def test_wrong_length_raises_and_stores_nothing(store: DiskStore, directory: Path) -> None:
    body = body_for("a")
    meta = meta_for("a", body, length=len(body) + 1)
    with pytest.raises(VerificationError):
        store.put(meta, body)
    assert not store.contains(meta.key)
    assert value_files(directory) == []
    assert staging_files(directory) == []


def test_failed_verification_keeps_the_previous_object(store: DiskStore) -> None:
    good = body_for("good")
    meta = meta_for("a", good)
    store.put(meta, good)
    bad = body_for("bad")
    with pytest.raises(VerificationError):
        store.put(meta, bad)  # meta describes `good`, not `bad`
    assert store.open(meta.key, read_below=1 << 20).body == good


def test_commit_removes_its_staging_file(store: DiskStore, directory: Path) -> None:
    body = body_for("a")
    staged = store.stage(body)
    assert staged.path.parent == directory / STAGING_DIR
    assert staged.path.read_bytes() == body
    store.commit(meta_for("a", body), staged)
    assert staging_files(directory) == []


def test_leftover_staging_file_is_removed_on_startup(directory: Path) -> None:
    first = DiskStore(directory, StoreSettings(size_limit=BIG_LIMIT))
    body = body_for("a")
    leftover = first.stage(body)  # a write that crashed before its commit
    first.close()
    second = DiskStore(directory, StoreSettings(size_limit=BIG_LIMIT))
    try:
        assert not leftover.path.exists()
        assert staging_files(directory) == []
        assert second.open(meta_for("a", body).key).outcome is Outcome.MISS
        assert second.count() == 0
    finally:
        second.close()


# -- damage on disk ------------------------------------------------------------------------


def test_truncated_value_file_is_corrupt_and_the_row_is_dropped(
    store: DiskStore, directory: Path
) -> None:
    body = body_for("a", 10_000)
    meta = meta_for("a", body)
    store.put(meta, body)
    (path,) = value_files(directory)
    os.truncate(path, 100)
    assert store.open(meta.key).outcome is Outcome.CORRUPT
    assert not store.contains(meta.key)
    assert store.open(meta.key).outcome is Outcome.MISS


def test_truncated_small_value_file_is_not_served_from_memory(
    store: DiskStore, directory: Path
) -> None:
    body = body_for("a", 1000)
    meta = meta_for("a", body)
    store.put(meta, body)
    (path,) = value_files(directory)
    os.truncate(path, 10)
    opened = store.open(meta.key, read_below=1 << 20)
    assert opened.outcome is Outcome.CORRUPT
    assert opened.body is None


def test_missing_value_file_is_corrupt_and_the_row_is_dropped(
    store: DiskStore, directory: Path
) -> None:
    # Outcome.CORRUPT is documented as "the row's file was missing or of the wrong size;
    # the row is dropped".
    body = body_for("a", 10_000)
    meta = meta_for("a", body)
    store.put(meta, body)
    (path,) = value_files(directory)
    path.unlink()
    assert store.open(meta.key).outcome is Outcome.CORRUPT
    assert not store.contains(meta.key)


# -- delete --------------------------------------------------------------------------------


def test_delete_removes_the_object_and_its_file(store: DiskStore, directory: Path) -> None:
    body = body_for("a")
    meta = meta_for("a", body)
    store.put(meta, body)
    assert store.delete(meta.key) is True
    assert store.open(meta.key).outcome is Outcome.MISS
    assert value_files(directory) == []


def test_delete_of_an_absent_key_returns_false(store: DiskStore) -> None:
    assert store.delete("f" * 64) is False


# -- size eviction -------------------------------------------------------------------------

OBJECT_BYTES = 10_000
SMALL_LIMIT = 200_000


def fill_until_eviction(
    store: DiskStore, first: str, refresh_first: bool, max_objects: int = 100
) -> list[str]:
    """Puts `first`, then more objects until a commit evicts; returns the names put."""
    names = [first]
    body = body_for(first, OBJECT_BYTES)
    assert store.put(meta_for(first, body), body) == 0
    for i in range(max_objects):
        name = f"obj{i}"
        names.append(name)
        body = body_for(name, OBJECT_BYTES)
        if refresh_first:
            store.refresh([meta_for(first, b"").key], now=time.time() + 10_000)
        if store.put(meta_for(name, body), body) > 0:
            return names
    raise AssertionError("no commit evicted anything")


def test_size_limit_evicts_and_bounds_the_volume(directory: Path) -> None:
    store = DiskStore(directory, StoreSettings(size_limit=SMALL_LIMIT))
    try:
        evicted = 0
        for i in range(60):
            body = body_for(f"o{i}", OBJECT_BYTES)
            evicted += store.put(meta_for(f"o{i}", body), body)
            assert store.volume() <= SMALL_LIMIT
        assert evicted > 0
        assert store.count() == 60 - evicted
        assert store.count() * OBJECT_BYTES <= SMALL_LIMIT
        assert len(value_files(directory)) == store.count()
    finally:
        store.close()


def test_eviction_takes_the_oldest_object_first(directory: Path) -> None:
    store = DiskStore(directory, StoreSettings(size_limit=SMALL_LIMIT))
    try:
        names = fill_until_eviction(store, "first", refresh_first=False)
        assert not store.contains(meta_for("first", b"").key)
        assert store.contains(meta_for(names[-1], b"").key)
    finally:
        store.close()


def test_refreshed_old_object_survives_over_newer_unrefreshed_ones(directory: Path) -> None:
    store = DiskStore(directory, StoreSettings(size_limit=SMALL_LIMIT))
    try:
        names = fill_until_eviction(store, "first", refresh_first=True)
        assert store.contains(meta_for("first", b"").key)
        assert not store.contains(meta_for(names[1], b"").key)
        assert store.contains(meta_for(names[-1], b"").key)
    finally:
        store.close()


def test_refresh_of_no_keys_is_a_no_op(store: DiskStore) -> None:
    store.refresh([])
    assert store.count() == 0
