"""edge/cache/hot.py: the in-memory hot tier, shared descriptors and the purge stamp."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nearvoice.edge.cache.hot import HotSettings, HotTier, PurgeStamp, SharedFile
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.policy import Policy

NOW = 1_700_000_000.0
OpenFd = Callable[..., int]


def meta(name: str, length: int = 10, *, stored_at: float = NOW, ttl: int = 3600) -> ObjectMeta:
    key = name.encode().hex().ljust(64, "0")
    return ObjectMeta(
        key=key,
        content_type="audio/wav",
        length=length,
        etag=etag_for(key),
        sha256="0" * 64,
        policy=Policy.HOT,
        stored_at=stored_at,
        ttl=ttl,
    )


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def open_fd(tmp_path: Path) -> Iterator[OpenFd]:
    """Opens real files; at teardown closes those the test left open (and only those)."""
    opened: list[tuple[int, int]] = []

    def _open(name: str = "body", size: int = 100) -> int:
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        fd = os.open(path, os.O_RDONLY)
        opened.append((fd, os.fstat(fd).st_ino))
        return fd

    yield _open
    for fd, inode in opened:
        try:
            still_ours = os.fstat(fd).st_ino == inode
        except OSError:
            continue
        if still_ours:
            os.close(fd)


def tier(**settings: float) -> HotTier:
    return HotTier(HotSettings(**settings))  # type: ignore[arg-type]


# -- memory-held entries -------------------------------------------------------------------


def test_put_then_get_returns_the_body() -> None:
    hot = tier()
    m = meta("a")
    hot.put(m, body=b"0123456789", fd=-1, now=NOW)
    entry = hot.get(m.key, NOW)
    assert entry is not None
    assert entry.body == b"0123456789"
    assert entry.meta == m


def test_get_of_an_unknown_key_is_none() -> None:
    assert tier().get("f" * 64, NOW) is None


def test_memory_counts_held_bodies() -> None:
    hot = tier()
    hot.put(meta("a"), body=b"x" * 30, fd=-1, now=NOW)
    hot.put(meta("b"), body=b"x" * 12, fd=-1, now=NOW)
    assert hot.memory == 42


def test_memory_budget_evicts_the_least_recently_used() -> None:
    hot = tier(memory_budget=100)
    a, b, c = meta("a"), meta("b"), meta("c")
    hot.put(a, body=b"a" * 40, fd=-1, now=NOW)
    hot.put(b, body=b"b" * 40, fd=-1, now=NOW)
    assert hot.get(a.key, NOW) is not None  # a is now the most recent
    hot.put(c, body=b"c" * 40, fd=-1, now=NOW)
    assert hot.get(b.key, NOW) is None
    assert hot.get(a.key, NOW) is not None
    assert hot.get(c.key, NOW) is not None
    assert hot.memory == 80


def test_memory_never_exceeds_the_budget() -> None:
    hot = tier(memory_budget=1000)
    for i in range(100):
        hot.put(meta(f"k{i}"), body=b"x" * 97, fd=-1, now=NOW)
        assert hot.memory <= 1000
    assert len(hot) == 10


def test_replacing_a_key_does_not_double_count_memory() -> None:
    hot = tier()
    m = meta("a")
    hot.put(m, body=b"x" * 50, fd=-1, now=NOW)
    hot.put(m, body=b"y" * 20, fd=-1, now=NOW)
    assert hot.memory == 20
    assert len(hot) == 1


def test_drop_forgets_the_entry_and_its_memory() -> None:
    hot = tier()
    m = meta("a")
    hot.put(m, body=b"x" * 50, fd=-1, now=NOW)
    assert hot.drop(m.key) is True
    assert hot.drop(m.key) is False
    assert hot.get(m.key, NOW) is None
    assert hot.memory == 0


# -- freshness -----------------------------------------------------------------------------


def test_entry_is_served_until_revalidate_after() -> None:
    hot = tier(revalidate_after=10.0)
    m = meta("a")
    hot.put(m, body=b"x", fd=-1, now=NOW)
    assert hot.get(m.key, NOW + 10.0) is not None


def test_entry_past_revalidate_after_is_dropped() -> None:
    hot = tier(revalidate_after=10.0)
    m = meta("a")
    hot.put(m, body=b"x" * 5, fd=-1, now=NOW)
    assert hot.get(m.key, NOW + 10.5) is None
    assert len(hot) == 0
    assert hot.memory == 0


def test_stale_entry_is_dropped() -> None:
    hot = tier(revalidate_after=1e9)
    m = meta("a", stored_at=NOW - 100, ttl=60)
    hot.put(m, body=b"x", fd=-1, now=NOW - 50)
    assert hot.get(m.key, NOW - 50) is not None
    assert hot.get(m.key, NOW - 40) is None
    assert len(hot) == 0


# -- descriptor-held entries ---------------------------------------------------------------


def test_descriptor_entries_use_no_memory(open_fd: OpenFd) -> None:
    hot = tier()
    fd = open_fd()
    entry = hot.put(meta("a", 100), body=None, fd=fd, now=NOW)
    assert entry.file is not None
    assert entry.file.fd == fd
    assert hot.memory == 0


def test_max_open_files_closes_the_evicted_descriptor(open_fd: OpenFd) -> None:
    hot = tier(max_open_files=2)
    fds = [open_fd(f"f{i}") for i in range(3)]
    for i, fd in enumerate(fds):
        hot.put(meta(f"k{i}"), body=None, fd=fd, now=NOW)
    assert len(hot) == 2
    with pytest.raises(OSError):
        os.fstat(fds[0])
    assert is_open(fds[1])
    assert is_open(fds[2])


def test_drop_closes_the_descriptor(open_fd: OpenFd) -> None:
    hot = tier()
    fd = open_fd()
    m = meta("a")
    hot.put(m, body=None, fd=fd, now=NOW)
    hot.drop(m.key)
    assert not is_open(fd)


def test_replacing_a_descriptor_entry_closes_the_old_descriptor(open_fd: OpenFd) -> None:
    hot = tier()
    m = meta("a")
    old, new = open_fd("old"), open_fd("new")
    hot.put(m, body=None, fd=old, now=NOW)
    hot.put(m, body=None, fd=new, now=NOW)
    assert not is_open(old)
    assert is_open(new)


def test_clear_closes_every_descriptor(open_fd: OpenFd) -> None:
    hot = tier()
    fds = [open_fd(f"f{i}") for i in range(3)]
    for i, fd in enumerate(fds):
        hot.put(meta(f"k{i}"), body=None, fd=fd, now=NOW)
    hot.clear()
    assert len(hot) == 0
    assert not any(is_open(fd) for fd in fds)


def test_acquired_descriptor_stays_open_after_eviction_until_released(open_fd: OpenFd) -> None:
    hot = tier(max_open_files=1)
    first, second = open_fd("first"), open_fd("second")
    entry = hot.put(meta("a"), body=None, fd=first, now=NOW)
    assert entry.file is not None
    sending = entry.file.acquire()
    hot.put(meta("b"), body=None, fd=second, now=NOW)  # evicts "a"
    assert hot.get(meta("a").key, NOW) is None
    assert os.pread(sending.fd, 3, 0) == b"xxx"
    sending.release()
    assert not is_open(first)


def test_expired_descriptor_entry_is_closed_when_dropped(open_fd: OpenFd) -> None:
    hot = tier(revalidate_after=1.0)
    fd = open_fd()
    m = meta("a")
    hot.put(m, body=None, fd=fd, now=NOW)
    assert hot.get(m.key, NOW + 5) is None
    assert not is_open(fd)


def test_shared_file_closes_on_last_release(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    shared = SharedFile(os.open(path, os.O_RDONLY))
    shared.acquire()
    shared.acquire()
    shared.release()
    shared.release()
    assert is_open(shared.fd)
    shared.release()
    assert not is_open(shared.fd)


# -- purge stamp ---------------------------------------------------------------------------


def test_purge_stamp_is_unchanged_without_a_bump(tmp_path: Path) -> None:
    stamp = PurgeStamp(tmp_path / "purge")
    assert stamp.changed() is False


def test_purge_stamp_sees_a_bump_from_another_instance(tmp_path: Path) -> None:
    path = tmp_path / "purge"
    worker_a, worker_b = PurgeStamp(path), PurgeStamp(path)
    worker_a.bump()
    assert worker_b.changed() is True


def test_purge_stamp_reports_a_bump_only_once(tmp_path: Path) -> None:
    path = tmp_path / "purge"
    worker_a, worker_b = PurgeStamp(path), PurgeStamp(path)
    worker_a.bump()
    assert worker_b.changed() is True
    assert worker_b.changed() is False


def test_purge_stamp_sees_every_consecutive_bump(tmp_path: Path) -> None:
    path = tmp_path / "purge"
    worker_a, worker_b = PurgeStamp(path), PurgeStamp(path)
    for _ in range(3):
        worker_a.bump()
        assert worker_b.changed() is True


def test_purge_stamp_creates_its_file(tmp_path: Path) -> None:
    path = tmp_path / "purge"
    PurgeStamp(path)
    assert path.exists()


def test_purge_stamp_counts_purges_from_two_workers_between_checks(tmp_path: Path) -> None:
    path = tmp_path / "purge"
    worker_a, worker_b, observer = PurgeStamp(path), PurgeStamp(path), PurgeStamp(path)
    worker_a.bump()
    assert observer.changed() is True
    worker_a.bump()
    worker_b.bump()
    assert observer.read() == 3
    assert observer.changed() is True
