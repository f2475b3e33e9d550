"""The disk cache under a full filesystem and a small size_limit: a real 8 MiB tmpfs (as
root; mounting is how the kernel's own ENOSPC is reached) under a store whose size_limit
is the default 10 GiB, and a 4 MiB size_limit on an ordinary directory.

A full disk evicts the oldest objects and stores the new one; the store warns at start
when its size_limit is more than the filesystem has room for; and eviction removes only
as much as it takes, so the cache fills to its limit instead of a third of it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.cache.store import DiskStore, StoreSettings
from nearvoice.edge.policy import Policy
from tests.support import payload

TMPFS_SIZE = 8 * 1024**2
OBJECT_BYTES = 600_000


def meta_for(name: str, body: bytes) -> ObjectMeta:
    key = hashlib.sha256(name.encode()).hexdigest()
    return ObjectMeta(
        key=key,
        content_type="audio/wav",
        length=len(body),
        etag=etag_for(key),
        sha256=hashlib.sha256(body).hexdigest(),
        policy=Policy.HOT,
        stored_at=1_700_000_000.0,
        ttl=86400 * 365 * 100,
    )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, mounted for this test only."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the size_limit test still runs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_filesystem_evicts_and_stores_the_new_object(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nearvoice.store"):
        store = DiskStore(tmpfs / "cache", StoreSettings())  # 10 GiB on an 8 MiB disk
    try:
        assert any("size_limit" in r.getMessage() for r in caplog.records), (
            "no warning that size_limit exceeds the room on the filesystem"
        )
        evicted = 0
        names = [f"object {n}" for n in range(40)]  # 24 MB through an 8 MiB disk
        for n, name in enumerate(names):
            body = payload(OBJECT_BYTES, n)
            evicted += store.put(meta_for(name, body), body)
            assert store.contains(meta_for(name, body).key), f"{name} was not stored"
        assert evicted > 0
        kept = [name for name in names if store.contains(meta_for(name, b"").key)]
        # The newest objects stay, the oldest went, and the disk is well used.
        assert kept == names[-len(kept) :]
        assert len(kept) * OBJECT_BYTES >= 0.7 * TMPFS_SIZE
        # Every kept object reads back whole.
        for name in kept:
            opened = store.open(meta_for(name, b"").key)
            assert opened.meta is not None and opened.fd >= 0
            os.close(opened.fd)
    finally:
        store.close()


def test_no_warning_when_the_filesystem_has_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nearvoice.store"):
        DiskStore(tmp_path / "cache", StoreSettings(size_limit=4 * 1024**2)).close()
    assert not caplog.records


def test_the_cache_fills_to_its_size_limit_before_evicting(tmp_path: Path) -> None:
    limit = 4 * 1024**2
    store = DiskStore(tmp_path / "cache", StoreSettings(size_limit=limit))
    try:
        body_size = 700_000
        for n in range(20):
            body = payload(body_size, n)
            store.put(meta_for(f"line {n}", body), body)
            assert store.volume() <= limit
        # At most one object's worth below the limit (diskcache's own cull dropped ten
        # objects at a time and left 2 of 4 MiB).
        assert store.volume() >= limit - body_size
        assert store.volume() >= 0.8 * limit
        assert store.count() == (limit - 200_000) // body_size  # index pages take a little
    finally:
        store.close()
