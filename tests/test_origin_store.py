"""The origin's persistent object store (origin/store.py), on both backends.

Shared behaviour runs against a `FilesystemStore` in a temp directory and an `S3Store` on a
real SeaweedFS (tests/seaweed.py), one server for the module; every S3 test works under its
own key prefix, so the tests do not see each other's objects. Filesystem faults are real
kernel errors: a tmpfs remounted read-only (or an immutable directory, or, for a non-root
user, a directory without write permission), a 64 KiB tmpfs that fills up, and
RLIMIT_FSIZE in a child process (EFBIG). Crashes are real too: a child process that dies
with `os._exit` at a chosen point of a write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.policy import Policy
from nearvoice.origin.store import (
    META_SUFFIX,
    S3_META_FIELD,
    FilesystemStore,
    ObjectStore,
    S3Store,
    StoreError,
    StoreFull,
    StoreReadOnly,
    open_store,
)
from tests.seaweed import ADMIN, READER, SeaweedS3, free_ports, seaweed_fixture

REPO = Path(__file__).resolve().parents[1]
BUCKET = "nearvoice-test"

seaweed = seaweed_fixture(scope="module")


# -- helpers ---------------------------------------------------------------------------------


def new_key() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def make_body(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(f"{seed}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def make_meta(body: bytes, key: str | None = None, **overrides: Any) -> ObjectMeta:
    key = key or new_key()
    fields: dict[str, Any] = {
        "key": key,
        "content_type": "audio/wav",
        "length": len(body),
        "etag": etag_for(key),
        "sha256": hashlib.sha256(body).hexdigest(),
        "policy": Policy.HOT,
        "stored_at": 1_700_000_000.25,
        "ttl": 86400,
    }
    fields.update(overrides)
    return ObjectMeta(**fields)


def s3_store(server: SeaweedS3, prefix: str | None = None, **kwargs: Any) -> S3Store:
    creds = kwargs.pop("creds", ADMIN)
    return S3Store(
        kwargs.pop("bucket", BUCKET),
        prefix if prefix is not None else f"t/{uuid.uuid4().hex[:12]}",
        endpoint_url=server.endpoint,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        **kwargs,
    )


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


@dataclass
class Backend:
    store: ObjectStore
    reopen: Callable[[], ObjectStore]
    """Restarts what is behind the store (for S3: the server) and returns a new instance."""


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.slow)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[ObjectStore] = []

    def track(store: ObjectStore) -> ObjectStore:
        opened.append(store)
        return store

    if request.param == "filesystem":
        root = tmp_path / "objects"
        yield Backend(track(FilesystemStore(root)), lambda: track(FilesystemStore(root)))
    else:
        server: SeaweedS3 = request.getfixturevalue("seaweed")
        prefix = f"t/{uuid.uuid4().hex[:12]}"

        def reopen() -> ObjectStore:
            for store in opened:
                store.close()
            server.restart()
            return track(s3_store(server, prefix))

        yield Backend(track(s3_store(server, prefix)), reopen)
    for store in opened:
        store.close()


# -- shared behaviour --------------------------------------------------------------------------


def test_round_trip(backend: Backend) -> None:
    store = backend.store
    body = make_body(5000, seed=1)
    meta = make_meta(body, policy=Policy.PERSONAL, content_type="audio/ogg; codecs=opus")
    assert store.put(meta, body) is None
    assert store.get(meta.key) == (meta, body)
    assert store.head(meta.key) == meta


def test_empty_object(backend: Backend) -> None:
    store = backend.store
    meta = make_meta(b"")
    store.put(meta, b"")
    assert store.get(meta.key) == (meta, b"")
    assert store.head(meta.key) == meta
    assert store.get_range(meta.key, 0, 10) == b""


def test_get_range(backend: Backend) -> None:
    store = backend.store
    body = make_body(1000, seed=2)
    meta = make_meta(body)
    store.put(meta, body)
    key = meta.key
    assert store.get_range(key, 0, 10) == body[:10]  # start
    assert store.get_range(key, 400, 611) == body[400:611]  # middle
    assert store.get_range(key, 990, 1000) == body[990:]  # end
    assert store.get_range(key, 999, 1000) == body[999:]  # last byte
    assert store.get_range(key, 0, 1000) == body  # whole
    assert store.get_range(key, 900, 5000) == body[900:]  # crossing the end: clipped
    assert store.get_range(key, 1000, 2000) == b""  # starting at the end
    assert store.get_range(key, 5000, 6000) == b""  # after the end
    assert store.get_range(key, 10, 10) == b""  # empty
    with pytest.raises(ValueError):
        store.get_range(key, -1, 10)
    with pytest.raises(ValueError):
        store.get_range(key, 10, 9)


def test_large_object_ranges(backend: Backend) -> None:
    # Larger than SeaweedFS's 4 MiB filer chunk, so ranges cross a chunk boundary there.
    store = backend.store
    body = make_body(5 * 1024 * 1024 + 123, seed=3)
    meta = make_meta(body)
    store.put(meta, body)
    boundary = 4 * 1024 * 1024
    assert (
        store.get_range(meta.key, boundary - 100, boundary + 100)
        == (body[boundary - 100 : boundary + 100])
    )
    assert store.get(meta.key) == (meta, body)


def test_missing_key(backend: Backend) -> None:
    store = backend.store
    key = new_key()
    assert store.get(key) is None
    assert store.head(key) is None
    assert store.get_range(key, 0, 10) is None
    assert store.get_range(key, 0, 0) is None
    assert store.get_range(key, 100, 200) is None
    assert store.delete(key) is False


def test_delete(backend: Backend) -> None:
    store = backend.store
    body = make_body(300, seed=4)
    meta = make_meta(body)
    store.put(meta, body)
    assert store.delete(meta.key) is True
    assert store.get(meta.key) is None
    assert store.head(meta.key) is None
    assert store.get_range(meta.key, 0, 10) is None
    assert store.delete(meta.key) is False


@pytest.mark.parametrize(
    "wrong",
    [
        {"sha256": hashlib.sha256(b"something else").hexdigest()},
        {"length": 99},
        {"length": 101},
    ],
    ids=["sha256", "shorter", "longer"],
)
def test_put_verifies_body(backend: Backend, wrong: dict[str, Any]) -> None:
    store = backend.store
    body = make_body(100, seed=5)
    meta = replace(make_meta(body), **wrong)
    with pytest.raises(ValueError, match=r"does not match|bytes"):
        store.put(meta, body)
    assert store.get(meta.key) is None
    assert store.head(meta.key) is None
    # A bad put over an existing object leaves that object alone.
    good = make_meta(body, key=meta.key)
    store.put(good, body)
    with pytest.raises(ValueError):
        store.put(replace(meta, stored_at=good.stored_at + 1), body)
    assert store.get(meta.key) == (good, body)


def test_put_verifies_before_writing_anything(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FilesystemStore(root)
    body = make_body(100)
    with pytest.raises(ValueError):
        store.put(replace(make_meta(body), sha256="0" * 64), body)
    assert not root.exists()


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABCDEF" + "0" * 58, "abc", "0" * 65, ""])
def test_malformed_keys_are_refused(backend: Backend, key: str) -> None:
    store = backend.store
    body = b"x"
    with pytest.raises(ValueError, match="malformed object key"):
        store.put(replace(make_meta(body), key=key), body)
    for call in (store.get, store.head, store.delete):
        with pytest.raises(ValueError, match="malformed object key"):
            call(key)
    with pytest.raises(ValueError, match="malformed object key"):
        store.get_range(key, 0, 1)


def test_overwrite_replaces_the_whole_object(backend: Backend) -> None:
    store = backend.store
    old = make_body(4096, seed=6)
    new = make_body(4096, seed=7)  # same length, other bytes
    old_meta = make_meta(old)
    new_meta = make_meta(new, key=old_meta.key, stored_at=old_meta.stored_at + 60)
    store.put(old_meta, old)
    store.put(new_meta, new)
    assert store.get(old_meta.key) == (new_meta, new)
    assert store.head(old_meta.key) == new_meta
    assert store.get_range(old_meta.key, 100, 200) == new[100:200]
    # Putting the same bytes again (what a deterministic re-render does) just refreshes it.
    again = replace(new_meta, stored_at=new_meta.stored_at + 60)
    store.put(again, new)
    assert store.get(old_meta.key) == (again, new)


def test_concurrent_readers_never_see_a_mixed_object(backend: Backend) -> None:
    store = backend.store
    bodies = [make_body(64 * 1024, seed=8), make_body(64 * 1024, seed=9)]
    key = new_key()
    metas = [make_meta(body, key=key, stored_at=1.0 + i) for i, body in enumerate(bodies)]
    store.put(metas[0], bodies[0])
    whole = {(metas[i], bodies[i]) for i in range(2)}
    ranges = {body[1000:50000] for body in bodies}
    # The filesystem uncommits an object before replacing it with different bytes, so a
    # reader may also find it briefly absent (see FilesystemStore); S3 swaps atomically.
    absent_ok = store.name == "filesystem"
    stop = threading.Event()
    bad: list[object] = []
    seen: list[object] = []

    def read() -> None:
        while not stop.is_set():
            found = store.get(key)
            if (found is None and not absent_ok) or (found is not None and found not in whole):
                bad.append(found)
            part = store.get_range(key, 1000, 50000)
            if (part is None and not absent_ok) or (part is not None and part not in ranges):
                bad.append(part)
            seen.append(found[0].sha256 if found else None)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for round_ in range(1, 25):
            store.put(metas[round_ % 2], bodies[round_ % 2])
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not bad, f"{len(bad)} mixed or missing reads"
    assert len(seen) > 3
    assert store.get(key) == (metas[0], bodies[0])  # 24 rounds: the last put was body 0


def test_objects_survive_a_restart(backend: Backend) -> None:
    body = make_body(20_000, seed=10)
    meta = make_meta(body)
    backend.store.put(meta, body)
    store = backend.reopen()
    assert store.get(meta.key) == (meta, body)
    assert store.get_range(meta.key, 19_990, 30_000) == body[19_990:]
    assert store.head(meta.key) == meta
    # And the restarted store takes writes again.
    more = make_body(10, seed=11)
    more_meta = make_meta(more)
    store.put(more_meta, more)
    assert store.get(more_meta.key) == (more_meta, more)


# -- open_store --------------------------------------------------------------------------------


def test_open_store_filesystem(tmp_path: Path) -> None:
    plain = open_store(str(tmp_path / "a"))
    assert isinstance(plain, FilesystemStore)
    assert plain.name == "filesystem"
    assert plain.root == tmp_path / "a"
    url = open_store(f"file://{tmp_path}/b%20c")
    assert isinstance(url, FilesystemStore)
    assert url.root == tmp_path / "b c"
    assert isinstance(open_store(f"file://localhost{tmp_path}"), FilesystemStore)
    assert isinstance(open_store("relative/objects"), FilesystemStore)
    assert isinstance(plain, ObjectStore)


@pytest.mark.parametrize(
    "url",
    ["", "file://otherhost/srv/objects", "file:///srv/objects?x=1", "file://", "ftp://h/x"],
)
def test_open_store_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


def test_open_store_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    store = open_store("s3://voices/origin/objects/?endpoint=http://127.0.0.1:8333")
    try:
        assert isinstance(store, S3Store)
        assert store.name == "s3"
        assert (store.bucket, store.prefix) == ("voices", "origin/objects")
        assert store.endpoint_url == "http://127.0.0.1:8333"
        assert store.region == "us-east-1"
        assert store.object_key("ab" * 32) == "origin/objects/" + "ab" * 32
        assert isinstance(store, ObjectStore)
    finally:
        store.close()
    store = open_store("s3://voices?region=eu-central-1")
    try:
        assert isinstance(store, S3Store)
        assert (store.prefix, store.region, store.endpoint_url) == ("", "eu-central-1", None)
        assert store.object_key("ab" * 32) == "ab" * 32
    finally:
        store.close()


@pytest.mark.parametrize(
    "url",
    [
        "s3://user:hunter2@voices/p?endpoint=http://127.0.0.1:8333",
        "s3://AKIDEXAMPLE@voices/p",
        "s3://voices/p?endpoint=http://127.0.0.1:8333&secret_key=hunter2",
        "s3://voices/p?aws_access_key_id=AKID&aws_secret_access_key=hunter2",
        "s3://voices/p?session_token=hunter2",
        "s3://voices/p?endpoint=http://user:hunter2@127.0.0.1:8333",
    ],
)
def test_open_store_refuses_credentials_in_the_url(url: str) -> None:
    with pytest.raises(ValueError, match="environment") as caught:
        open_store(url)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3:///prefix",
        "s3://Upper_Case/p",
        "s3://ab/p",
        "s3://voices/p?unknown=1",
        "s3://voices/p?region=a&region=b",
        "s3://voices/p?endpoint=ftp://127.0.0.1:8333",
        "s3://voices/p?endpoint=127.0.0.1:8333",
        "s3://voices/a/../b",
        "s3://voices/a//b",
        "s3://voices/p#frag",
    ],
)
def test_open_store_refuses_bad_s3_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


# -- filesystem specifics ------------------------------------------------------------------


def test_filesystem_layout(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    body = make_body(123)
    meta = make_meta(body)
    store.put(meta, body)
    directory = tmp_path / meta.key[:2] / meta.key[2:4]
    assert (directory / meta.key).read_bytes() == body
    assert (directory / (meta.key + META_SUFFIX)).read_text() == meta.to_tag()
    assert files_under(tmp_path) == [directory / meta.key, directory / (meta.key + META_SUFFIX)]


def test_a_body_without_metadata_is_never_returned(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    body = make_body(100)
    meta = make_meta(body)
    store.put(meta, body)
    store.meta_path(meta.key).unlink()
    assert store.get(meta.key) is None
    assert store.head(meta.key) is None
    assert store.get_range(meta.key, 0, 10) is None
    assert store.delete(meta.key) is False
    assert not store.value_path(meta.key).exists()  # delete cleared the orphan


def test_a_body_that_does_not_match_its_metadata_is_not_served(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    body = make_body(100, seed=1)
    meta = make_meta(body)
    store.put(meta, body)
    store.value_path(meta.key).write_bytes(make_body(100, seed=2))  # same length, other bytes
    assert store.get(meta.key) is None
    store.value_path(meta.key).write_bytes(body[:50])  # truncated
    assert store.get(meta.key) is None
    assert store.head(meta.key) is None
    assert store.get_range(meta.key, 0, 10) is None
    store.meta_path(meta.key).write_text("{not json")
    assert store.get(meta.key) is None
    # A put repairs it.
    store.put(meta, body)
    assert store.get(meta.key) == (meta, body)


def test_sweep_removes_what_crashes_leave(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    body = make_body(100)
    meta = make_meta(body)
    store.put(meta, body)
    directory = store.directory(meta.key)
    temp = directory / f".{meta.key}.deadbeef.tmp"
    temp.write_bytes(b"partial")
    orphan_key = meta.key[:4] + "f" * 60
    (directory / orphan_key).write_bytes(b"never committed")
    assert store.sweep() == 0  # too recent to be a crash's leftovers
    old = time.time() - 7200
    for path in (temp, directory / orphan_key, store.value_path(meta.key)):
        os.utime(path, (old, old))
    assert store.sweep() == 2
    assert files_under(tmp_path) == [store.value_path(meta.key), store.meta_path(meta.key)]
    assert store.get(meta.key) == (meta, body)


_CRASH_CHILD = """
import json, os, sys
from pathlib import Path
from nearvoice.edge.cache.meta import ObjectMeta
import nearvoice.origin.store as store_module

root, tag, body_hex, die_before = sys.argv[1:5]
meta = ObjectMeta.from_tag(tag)
real_replace = os.replace

def replace(src, dst):
    if str(dst).endswith(die_before):
        os._exit(17)  # the process dies here: no cleanup, no finally blocks
    real_replace(src, dst)

store_module.os.replace = replace
store_module.FilesystemStore(Path(root)).put(meta, bytes.fromhex(body_hex))
"""


def _crash_during_put(root: Path, meta: ObjectMeta, body: bytes, die_before: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, str(root), meta.to_tag(), body.hex(), die_before],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 17, child.stderr


def test_crash_between_body_and_metadata(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    # A new key: the body is in place, its metadata never was. The object does not exist.
    body = make_body(1000, seed=1)
    meta = make_meta(body)
    _crash_during_put(tmp_path, meta, body, META_SUFFIX)
    assert store.value_path(meta.key).read_bytes() == body
    assert store.get(meta.key) is None
    assert store.head(meta.key) is None
    assert store.get_range(meta.key, 0, 10) is None
    # Overwriting with other bytes: the old metadata was withdrawn before the new body went
    # in, so the crash cannot pair the old metadata with the new body.
    old = make_body(1000, seed=2)
    old_meta = make_meta(old)
    store.put(old_meta, old)
    new = make_body(1000, seed=3)
    _crash_during_put(tmp_path, make_meta(new, key=old_meta.key), new, META_SUFFIX)
    assert store.get(old_meta.key) is None
    assert store.head(old_meta.key) is None
    assert store.get_range(old_meta.key, 0, 1000) is None
    # Re-putting the same bytes: a crash at any point keeps the object whole.
    same = make_meta(body)
    store.put(same, body)
    _crash_during_put(tmp_path, replace(same, stored_at=same.stored_at + 1), body, META_SUFFIX)
    assert store.get(same.key) == (same, body)
    # A crash before the body is renamed in leaves only a temp file, which reads ignore.
    _crash_during_put(tmp_path, same, body, same.key)
    assert store.get(same.key) == (same, body)
    leftovers = [p for p in files_under(tmp_path) if p.name.endswith(".tmp")]
    assert leftovers
    for path in leftovers:
        os.utime(path, (0, 0))
    assert store.sweep() >= len(leftovers)
    assert not [p for p in files_under(tmp_path) if p.name.endswith(".tmp")]


# -- filesystem faults: real kernel errors ------------------------------------------------------


def _run(*args: str) -> bool:
    tool = shutil.which(args[0])
    if tool is None:
        return False
    done = subprocess.run([tool, *args[1:]], capture_output=True, check=False)
    return done.returncode == 0


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def mounts() -> Iterator[Callable[[Path, str], bool]]:
    """Mounts tmpfs filesystems for one test (as root, where mounting is permitted) and
    unmounts them afterwards."""
    mounted: list[Path] = []

    def mount_tmpfs(path: Path, size: str) -> bool:
        path.mkdir(parents=True, exist_ok=True)
        if not _can_mount():
            return False
        if not _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)):
            return False
        mounted.append(path)
        return True

    yield mount_tmpfs
    for path in reversed(mounted):
        if not _run("umount", str(path)):
            _run("umount", "-l", str(path))


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], bool]]:
    """Sets the immutable attribute on a tree (root ignores permissions, not this)."""
    marked: list[Path] = []

    def mark(path: Path) -> bool:
        if not _run("chattr", "-R", "+i", str(path)):
            return False
        marked.append(path)
        return True

    yield mark
    for path in marked:
        _run("chattr", "-R", "-i", str(path))


def test_read_only_store(
    tmp_path: Path,
    mounts: Callable[[Path, str], bool],
    immutable: Callable[[Path], bool],
) -> None:
    root = tmp_path / "ro"
    on_tmpfs = mounts(root, "1m")
    store = FilesystemStore(root)
    body = make_body(2000, seed=1)
    meta = make_meta(body)
    store.put(meta, body)

    # The most real read-only store first; each fallback still gets its error from the
    # kernel. chmod only works for a non-root user (root ignores permission bits).
    if on_tmpfs and _run("mount", "-o", "remount,ro", str(root)):
        method, expected = "tmpfs remounted read-only", {errno.EROFS}
    elif immutable(root):
        method, expected = "chattr +i", {errno.EPERM, errno.EACCES}
    elif os.geteuid() != 0:
        for directory in (root, *root.rglob("*")):
            if directory.is_dir():
                directory.chmod(0o555)
        method, expected = "chmod a-w (non-root)", {errno.EACCES}
    else:
        pytest.fail(
            "cannot make a read-only filesystem here: running as root, but neither mounting "
            "a tmpfs nor chattr +i is permitted",
            pytrace=False,
        )
    print(f"read-only store: {method}")  # shown with -rP

    other = make_body(100, seed=2)
    other_meta = make_meta(other)
    with pytest.raises(StoreReadOnly) as caught:
        store.put(other_meta, other)  # a new key: a new shard directory
    assert caught.value.errno in expected
    same_shard = make_meta(other, key=meta.key[:4] + other_meta.key[4:])
    with pytest.raises(StoreReadOnly):
        store.put(same_shard, other)  # an existing shard directory: the temp file
    with pytest.raises(StoreReadOnly):
        store.put(replace(meta, stored_at=meta.stored_at + 1), body)  # the existing key
    with pytest.raises(StoreReadOnly):
        store.delete(meta.key)
    assert isinstance(caught.value, StoreError)
    assert isinstance(caught.value, OSError)
    # Reads still work, and nothing changed.
    assert store.get(meta.key) == (meta, body)
    assert store.get_range(meta.key, 10, 20) == body[10:20]
    assert store.get(other_meta.key) is None
    assert store.get(same_shard.key) is None
    if os.geteuid() != 0 and method.startswith("chmod"):
        for directory in (root, *root.rglob("*")):
            if directory.is_dir():
                directory.chmod(0o755)


_FSIZE_CHILD = """
import hashlib, json, os, resource, signal, sys
from pathlib import Path
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.policy import Policy
from nearvoice.origin.store import FilesystemStore, StoreError

root, limit = Path(sys.argv[1]), int(sys.argv[2])

def meta_for(body, seed):
    key = hashlib.sha256(f"fsize-{seed}".encode()).hexdigest()
    return ObjectMeta(key, "audio/wav", len(body), etag_for(key),
                      hashlib.sha256(body).hexdigest(), Policy.HOT, 1.0, 60)

# Past the limit the kernel sends SIGXFSZ (which would kill us) and then fails with EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
store = FilesystemStore(root)
result = {}
for name, size in (("big", 4 * limit), ("small", limit // 4)):
    body = os.urandom(size)
    meta = meta_for(body, name)
    try:
        store.put(meta, body)
        result[name] = {"ok": True, "key": meta.key}
    except StoreError as exc:
        result[name] = {"error": type(exc).__name__, "errno": exc.errno, "key": meta.key}
print(json.dumps(result))
"""


def _put_under_file_size_limit(root: Path, limit: int) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(root), str(limit)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(child.stdout)
    return result


def _assert_no_partial_object(root: Path, key: str) -> None:
    store = FilesystemStore(root)
    assert store.get(key) is None
    assert store.head(key) is None
    assert store.get_range(key, 0, 10) is None
    assert not store.value_path(key).exists()
    assert not store.meta_path(key).exists()
    assert not [path for path in files_under(root) if path.name.endswith(".tmp")]


def test_full_store(
    tmp_path: Path,
    mounts: Callable[[Path, str], bool],
) -> None:
    root = tmp_path / "full"
    if mounts(root, "64k"):
        print("full store: 64 KiB tmpfs")  # shown with -rP
        store = FilesystemStore(root)
        body = make_body(256 * 1024)
        meta = make_meta(body)
        with pytest.raises(StoreFull) as caught:
            store.put(meta, body)
        assert caught.value.errno == errno.ENOSPC
        _assert_no_partial_object(root, meta.key)
        # The failed write gave its space back: a small object still fits.
        small = make_body(4096, seed=1)
        small_meta = make_meta(small)
        store.put(small_meta, small)
        assert store.get(small_meta.key) == (small_meta, small)
    else:
        # No tmpfs without privileges: a per-process file size limit is a real kernel
        # refusal too (EFBIG), from the same write path.
        print("full store: RLIMIT_FSIZE")
        result = _put_under_file_size_limit(root, 64 * 1024)
        assert result["big"]["error"] == "StoreFull"
        _assert_no_partial_object(root, result["big"]["key"])
        assert result["small"]["ok"]


def test_file_size_limit_is_store_full(tmp_path: Path) -> None:
    root = tmp_path / "fsize"
    result = _put_under_file_size_limit(root, 64 * 1024)
    assert result["big"] == {
        "error": "StoreFull",
        "errno": errno.EFBIG,
        "key": result["big"]["key"],
    }
    _assert_no_partial_object(root, result["big"]["key"])
    assert result["small"]["ok"]
    store = FilesystemStore(root)
    found = store.get(result["small"]["key"])
    assert found is not None and found[0].length == 64 * 1024 // 4


# -- S3 specifics --------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_object_carries_meta_as_user_metadata(seaweed: SeaweedS3) -> None:
    store = s3_store(seaweed)
    client = seaweed.client()
    try:
        body = make_body(777)
        meta = make_meta(body, content_type="audio/mpeg")
        store.put(meta, body)
        raw = client.head_object(Bucket=BUCKET, Key=store.object_key(meta.key))
        assert raw["Metadata"] == {S3_META_FIELD: meta.to_tag()}
        assert raw["ResponseMetadata"]["HTTPHeaders"]["x-amz-meta-nearvoice"] == meta.to_tag()
        assert raw["ContentType"] == "audio/mpeg"
        assert raw["ContentLength"] == 777
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_s3_refuses_metadata_over_the_limit(seaweed: SeaweedS3) -> None:
    # SeaweedFS itself accepts more than 2 KB of user metadata; AWS does not. We check.
    store = s3_store(seaweed)
    try:
        body = b"x"
        meta = make_meta(body, content_type="audio/wav; x=" + "y" * 2100)
        with pytest.raises(ValueError, match="user metadata"):
            store.put(meta, body)
        assert store.get(meta.key) is None
    finally:
        store.close()


@pytest.mark.slow
def test_s3_creates_the_bucket(seaweed: SeaweedS3) -> None:
    bucket = f"nv-{uuid.uuid4().hex[:12]}"
    store = s3_store(seaweed, bucket=bucket, prefix="")
    client = seaweed.client()
    try:
        key = new_key()
        assert store.get(key) is None  # a missing bucket reads as a missing object
        body = make_body(10)
        meta = make_meta(body, key=key)
        store.put(meta, body)
        client.head_bucket(Bucket=bucket)
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
        assert store.get(key) == (meta, body)
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_s3_ignores_foreign_and_damaged_objects(seaweed: SeaweedS3) -> None:
    store = s3_store(seaweed)
    client = seaweed.client()
    try:
        body = make_body(100, seed=1)
        meta = make_meta(body)
        store.put(meta, body)  # creates the bucket
        foreign = new_key()
        client.put_object(Bucket=BUCKET, Key=store.object_key(foreign), Body=b"not ours")
        assert store.get(foreign) is None
        assert store.head(foreign) is None
        assert store.get_range(foreign, 0, 3) is None
        # Our metadata, other bytes of the same length: never served whole.
        client.put_object(
            Bucket=BUCKET,
            Key=store.object_key(meta.key),
            Body=make_body(100, seed=2),
            Metadata={S3_META_FIELD: meta.to_tag()},
        )
        assert store.get(meta.key) is None
        # Metadata that names another key.
        client.put_object(
            Bucket=BUCKET,
            Key=store.object_key(foreign),
            Body=body,
            Metadata={S3_META_FIELD: meta.to_tag()},
        )
        assert store.get(foreign) is None
        store.put(meta, body)  # repaired
        assert store.get(meta.key) == (meta, body)
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_s3_read_only_credentials(seaweed: SeaweedS3) -> None:
    prefix = f"t/{uuid.uuid4().hex[:12]}"
    writer = s3_store(seaweed, prefix)
    reader = s3_store(seaweed, prefix, creds=READER)
    try:
        body = make_body(100)
        meta = make_meta(body)
        writer.put(meta, body)
        other = make_body(50)
        other_meta = make_meta(other)
        with pytest.raises(StoreReadOnly) as caught:
            reader.put(other_meta, other)
        assert caught.value.errno == errno.EROFS
        assert "AccessDenied" in str(caught.value)
        with pytest.raises(StoreReadOnly):
            reader.delete(meta.key)
        assert reader.get(meta.key) == (meta, body)
        assert reader.get_range(meta.key, 5, 10) == body[5:10]
        assert reader.get(other_meta.key) is None
    finally:
        writer.close()
        reader.close()


@pytest.mark.slow
def test_s3_wrong_credentials_and_no_server(seaweed: SeaweedS3) -> None:
    wrong = S3Store(
        BUCKET,
        "t",
        endpoint_url=seaweed.endpoint,
        access_key=ADMIN.access_key,
        secret_key="wrong-secret",
    )
    nowhere = S3Store(
        BUCKET,
        "t",
        endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}",  # nothing listens there
        access_key=ADMIN.access_key,
        secret_key=ADMIN.secret_key,
        connect_timeout=1.0,
        max_attempts=1,
    )
    try:
        for store in (wrong, nowhere):
            with pytest.raises(StoreError) as caught:
                store.get(new_key())
            assert not isinstance(caught.value, (StoreReadOnly, StoreFull))
            body = b"abc"
            with pytest.raises(StoreError) as caught:
                store.put(make_meta(body), body)
            assert not isinstance(caught.value, (StoreReadOnly, StoreFull))
            assert "wrong-secret" not in str(caught.value)
    finally:
        wrong.close()
        nowhere.close()


@pytest.mark.slow
def test_open_store_s3_from_environment(
    seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ADMIN.env().items():
        monkeypatch.setenv(name, value)
    store = open_store(f"s3://{BUCKET}/from-env/{uuid.uuid4().hex[:8]}?endpoint={seaweed.endpoint}")
    try:
        body = make_body(64)
        meta = make_meta(body)
        store.put(meta, body)
        assert store.get(meta.key) == (meta, body)
    finally:
        store.close()
