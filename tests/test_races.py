"""Regression tests for races between purges, stale copies, prefetches and the hot tier:
each reproduces a sequence found in review. The upstream is a small real aiohttp server
that serves (or fails) on purpose."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.hot import HotSettings
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.cache.store import DiskStore, Opened, Outcome, StoreSettings
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.node import IO_THREADS
from nearvoice.edge.policy import Policy, Retention
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.upstream import CHECKSUM_HEADER, UpstreamSettings
from tests.support import (
    eventually,
    make_config,
    make_keyring,
    make_spec,
    node_of,
    payload,
    put_object,
    sign,
)

KEYRING = make_keyring()
TOKEN = "admin-token-for-race-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
EXPIRED = Retention().hot + 600  # seconds in the past that makes a hot object stale


def joe(text: str) -> Spec:
    return make_spec(text, voice="joe", model=piper_model_id("joe"))


def open_cache_files(cache: Path) -> int:
    """Descriptors this process holds on object files (`.val`) under `cache`; sockets and
    the index database don't count."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(cache)) and target.endswith(".val")
    return count


async def upstream(aiohttp_server: AiohttpServer, state: dict[str, Any]) -> str:
    async def speech(request: web.Request) -> web.Response:
        state["hits"] += 1
        if "release" in state:
            await state["release"].wait()
        if state.get("status", 200) != 200:
            return web.Response(status=state["status"], text="down")
        body: bytes = state["body"]
        digest = hashlib.sha256(body).hexdigest()
        key = request.match_info["tail"].split(".", 1)[0]
        headers = {CHECKSUM_HEADER: digest, "Content-Type": "audio/wav", "ETag": etag_for(key)}
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/speech/{tail:.*}", speech)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def get(client: Any, url: str) -> tuple[int, bytes, str | None]:
    async with client.get(url) as resp:
        return resp.status, await resp.read(), resp.headers.get("Age")


async def test_a_purge_right_after_a_fill_is_not_undone_by_the_lingering_fill(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    state: dict[str, Any] = {"hits": 0, "body": b"OLD" * 400}
    base = await upstream(aiohttp_server, state)
    client = await aiohttp_client(
        create_app(make_config(tmp_path, upstreams=(base,)), KEYRING, engines=[])
    )
    spec = joe("purge me")
    _, first, _ = await get(client, sign(KEYRING, spec))
    state["body"] = b"NEW" * 400
    async with client.post("/admin/purge", json={"keys": [spec.key]}, headers=ADMIN) as resp:
        assert resp.status == 200
    status, second, _ = await get(client, sign(KEYRING, spec))
    assert status == 200
    assert (first, second) == (b"OLD" * 400, b"NEW" * 400)
    assert state["hits"] == 2


async def test_a_purge_answers_only_once_a_commit_it_raced_with_is_undone(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sequence behind the test above's rare failure: the client has read the whole
    body (its length was known), the fill is still writing it to the disk store, the
    purge's delete runs first and finds nothing, then the write lands. Its producer
    deletes it again; the purge must not answer before that, or the next request reads
    the purged bytes. The store's own put and delete run, held and logged here."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    state: dict[str, Any] = {"hits": 0, "body": b"OLD" * 400}
    base = await upstream(aiohttp_server, state)
    app = create_app(make_config(tmp_path, upstreams=(base,)), KEYRING, engines=[])
    client = await aiohttp_client(app)
    store = node_of(app).store
    put, delete = store.put, store.delete
    writing, landed = threading.Event(), threading.Event()
    log: list[str] = []

    def held_put(meta: ObjectMeta, body: bytes) -> int:
        writing.set()
        landed.wait(10)  # until the purge's delete has run
        evicted = put(meta, body)
        log.append("put")
        return evicted

    def logged_delete(key: str) -> bool:
        removed = delete(key)
        log.append("delete")
        landed.set()  # the write lands after the purge's delete: the race
        return removed

    monkeypatch.setattr(store, "put", held_put)
    monkeypatch.setattr(store, "delete", logged_delete)
    spec = joe("purged while committing")
    _, first, _ = await get(client, sign(KEYRING, spec))
    assert first == b"OLD" * 400
    assert await asyncio.to_thread(writing.wait, 10)
    state["body"] = b"NEW" * 400
    async with client.post("/admin/purge", json={"keys": [spec.key]}, headers=ADMIN) as resp:
        assert resp.status == 200
    log.append("answered")
    assert log == ["delete", "put", "delete", "answered"]
    assert store.open(spec.key, 0).outcome is Outcome.MISS
    status, second, _ = await get(client, sign(KEYRING, spec))
    assert (status, second) == (200, b"NEW" * 400)


async def test_prefetch_refills_stale_objects_and_keeps_no_descriptor(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    state: dict[str, Any] = {"hits": 0, "body": b"fresh" * 1000}
    base = await upstream(aiohttp_server, state)
    config = make_config(tmp_path, hot=HotSettings(max_object_bytes=1024), upstreams=(base,))
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    urls = []
    for i in range(10):
        spec = joe(f"stale {i}")
        put_object(app, spec, payload(4096, i), stored_at=time.time() - EXPIRED)
        urls.append("http://edge" + sign(KEYRING, spec))
    async with client.post("/admin/prefetch", json={"urls": urls}, headers=ADMIN) as resp:
        job = await resp.json()
    report: dict[str, Any] = {}
    for _ in range(200):
        async with client.get(job["progress"], headers=ADMIN) as resp:
            report = await resp.json()
        if report["state"] == "finished":
            break
        await asyncio.sleep(0.05)
    gc.collect()
    assert report["already_cached"] == 0
    assert report["done"] == 10 and report["failed"] == 0
    assert state["hits"] == 10
    assert open_cache_files(tmp_path) == 0


async def test_an_object_is_sent_whole_when_the_hot_tier_holds_no_descriptors(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    config = make_config(tmp_path, hot=HotSettings(max_object_bytes=1024, max_open_files=0))
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    spec = joe("big one")
    body = payload(100_000, 1)
    put_object(app, spec, body)
    async with client.get(sign(KEYRING, spec), timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        assert await resp.read() == body


async def test_requests_that_joined_a_failed_fill_also_get_the_stale_copy(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    release = asyncio.Event()
    state: dict[str, Any] = {"hits": 0, "status": 503, "release": release}
    base = await upstream(aiohttp_server, state)
    config = make_config(
        tmp_path, upstreams=(base,), upstream=UpstreamSettings(retries=0, failure_threshold=100)
    )
    app = create_app(config, KEYRING, engines=[])
    client = await aiohttp_client(app)
    node = node_of(app)
    spec = joe("stale, shared")
    body = payload(500, 3)
    put_object(app, spec, body, stored_at=time.time() - EXPIRED)
    url = sign(KEYRING, spec)

    first = asyncio.create_task(get(client, url))
    await eventually(lambda: state["hits"] == 1)  # the fill is under way, held upstream
    joined = asyncio.create_task(get(client, url))
    # Both requests read the one fill before the upstream fails it.
    await eventually(lambda: node._fills[spec.key].readers == 2)
    release.set()
    for status, got, age in await asyncio.gather(first, joined):
        assert (status, got) == (200, body)
        assert age is not None and int(age) >= EXPIRED
    assert state["hits"] == 1


# -- races found by reading the code ----------------------------------------------------------

WAIT_LIMIT = 30.0  # seconds a held thread waits for the test's go-ahead at most


async def test_a_purge_while_a_lookup_waits_on_the_disk_is_not_undone(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    state: dict[str, Any] = {"hits": 0, "body": b"NEW" * 400}
    base = await upstream(aiohttp_server, state)
    app = create_app(make_config(tmp_path, upstreams=(base,)), KEYRING, engines=[])
    client = await aiohttp_client(app)
    node = node_of(app)
    spec = joe("purged while being read")
    put_object(app, spec, b"OLD" * 400)

    # The real store's open, held after it has read the old object and before the
    # lookup gets its answer back.
    real_open = node.store.open
    have_read, go = threading.Event(), threading.Event()

    def held_open(key: str, read_below: int = 0) -> Opened:
        opened = real_open(key, read_below)
        have_read.set()
        go.wait(WAIT_LIMIT)
        return opened

    monkeypatch.setattr(node.store, "open", held_open)
    lookup = asyncio.create_task(node.lookup(spec.key))
    assert await asyncio.to_thread(have_read.wait, WAIT_LIMIT)
    monkeypatch.setattr(node.store, "open", real_open)
    async with client.post("/admin/purge", json={"keys": [spec.key]}, headers=ADMIN) as resp:
        assert (await resp.json())["purged"] == [spec.key]
    go.set()
    assert await lookup is None  # what it read was purged meanwhile
    status, got, _ = await get(client, sign(KEYRING, spec))
    assert (status, got) == (200, b"NEW" * 400)
    assert state["hits"] == 1


async def test_a_lookup_during_a_purges_disk_delete_does_not_refill_the_hot_tier(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    state: dict[str, Any] = {"hits": 0, "body": b"NEW" * 400}
    base = await upstream(aiohttp_server, state)
    app = create_app(make_config(tmp_path, upstreams=(base,)), KEYRING, engines=[])
    client = await aiohttp_client(app)
    node = node_of(app)
    spec = joe("read while its purge deletes it")
    put_object(app, spec, b"OLD" * 400)

    # The purge's delete from disk, held until the lookup below has read the disk.
    real_delete = node.store.delete
    deleting, go = threading.Event(), threading.Event()

    def held_delete(key: str) -> bool:
        deleting.set()
        go.wait(WAIT_LIMIT)
        return real_delete(key)

    monkeypatch.setattr(node.store, "delete", held_delete)
    purge = asyncio.create_task(node.purge(spec.key))
    assert await asyncio.to_thread(deleting.wait, WAIT_LIMIT)
    try:
        assert await node.lookup(spec.key) is None  # the object is on disk, but going
    finally:
        go.set()
    assert await purge
    status, got, _ = await get(client, sign(KEYRING, spec))
    assert (status, got) == (200, b"NEW" * 400)


class CommitBetweenLooks:
    """The store's real diskcache, with a commit of the same key landing right after the
    first `get` answers "absent" (as a refill on another thread would)."""

    def __init__(self, real: Any, commit: Any) -> None:
        self._real = real
        self._commit = commit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __contains__(self, key: object) -> bool:
        return key in self._real

    def get(self, *args: Any, **kwargs: Any) -> Any:
        answer = self._real.get(*args, **kwargs)
        if self._commit is not None:
            commit, self._commit = self._commit, None
            commit()
        return answer


def test_open_keeps_an_object_committed_between_its_two_looks(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "cache", StoreSettings(size_limit=1 << 30))
    try:
        spec = joe("refilled meanwhile")
        body = payload(5000, 9)
        meta = ObjectMeta(
            key=spec.key,
            content_type="audio/wav",
            length=len(body),
            etag=etag_for(spec.key),
            sha256=hashlib.sha256(body).hexdigest(),
            policy=Policy.HOT,
            stored_at=time.time(),
            ttl=3600,
        )
        real = store._cache
        store._cache = CommitBetweenLooks(real, lambda: store.put(meta, body))
        opened = store.open(spec.key)
        store._cache = real
        assert opened.outcome is not Outcome.CORRUPT
        if opened.fd >= 0:
            os.close(opened.fd)
        assert store.contains(spec.key), "the fresh commit was deleted as corrupt"
    finally:
        store.close()


def test_orphaned_value_files_are_collected_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    store = DiskStore(directory, StoreSettings(size_limit=1 << 30))
    body = payload(3000, 4)
    spec = joe("kept")
    meta = ObjectMeta(
        key=spec.key,
        content_type="audio/wav",
        length=len(body),
        etag=etag_for(spec.key),
        sha256=hashlib.sha256(body).hexdigest(),
        policy=Policy.HOT,
        stored_at=time.time(),
        ttl=3600,
    )
    store.put(meta, body)
    store.close()
    # What a crash between the rename into the value store and the index commit leaves.
    old = directory / "ab" / "cd"
    old.mkdir(parents=True, exist_ok=True)
    (old / "orphan.val").write_bytes(b"x" * 1000)
    os.utime(old / "orphan.val", (0, 0))
    (old / "young.val").write_bytes(b"y" * 10)  # a sibling worker may be mid-commit

    store = DiskStore(directory, StoreSettings(size_limit=1 << 30))
    try:
        assert not (old / "orphan.val").exists()
        assert (old / "young.val").exists()
        opened = store.open(spec.key)
        assert opened.outcome is Outcome.HIT
        os.close(opened.fd)
    finally:
        store.close()


def test_a_commit_syncs_the_directory_it_renamed_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path / "cache", StoreSettings(size_limit=1 << 30))
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            synced.append(info.st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    try:
        spec = joe("durable")
        body = payload(2000, 5)
        store.put(
            ObjectMeta(
                key=spec.key,
                content_type="audio/wav",
                length=len(body),
                etag=etag_for(spec.key),
                sha256=hashlib.sha256(body).hexdigest(),
                policy=Policy.HOT,
                stored_at=time.time(),
                ttl=3600,
            ),
            body,
        )
        (value,) = [p for p in (tmp_path / "cache").rglob("*.val")]
        assert value.parent.stat().st_ino in synced
    finally:
        store.close()


async def test_hits_do_not_queue_behind_commits(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    app = create_app(make_config(tmp_path), KEYRING, engines=[])
    client = await aiohttp_client(app)
    node = node_of(app)
    spec = joe("a hit during a burst of commits")
    body = payload(4000, 6)
    put_object(app, spec, body)
    # Every commit thread busy (as fsyncs of a burst of misses keep them).
    release = threading.Event()
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(node.io, release.wait, WAIT_LIMIT) for _ in range(IO_THREADS)]
    try:
        async with asyncio.timeout(WAIT_LIMIT / 2):
            status, got, _ = await get(client, sign(KEYRING, spec))
        assert (status, got) == (200, body)
    finally:
        release.set()
        await asyncio.gather(*busy)


async def test_the_url_memo_is_lru_and_survives_purges(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    monkeypatch.setattr("nearvoice.edge.node.GRANT_MEMO_SIZE", 3)
    app = create_app(make_config(tmp_path), KEYRING, engines=[])
    client = await aiohttp_client(app)
    node = node_of(app)
    urls = {}
    for name in "abcd":
        spec = joe(f"memo {name}")
        put_object(app, spec, payload(300, ord(name)))
        urls[name] = (spec, sign(KEYRING, spec))
    for name in "abca":  # a is used again: b is now the least recently used
        assert (await get(client, urls[name][1]))[0] == 200
    assert (await get(client, urls["d"][1]))[0] == 200

    def memoized(name: str) -> bool:
        return node.remembered(urls[name][1], "127.0.0.1", time.time()) is not None

    assert [memoized(n) for n in "abcd"] == [True, False, True, True]
    async with client.post(
        "/admin/purge", json={"keys": [urls["a"][0].key]}, headers=ADMIN
    ) as resp:
        assert resp.status == 200
    assert memoized("a") and memoized("c"), "a purge forgot verified URLs"


async def test_prefetch_lets_go_of_the_fills_it_joined(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    release = asyncio.Event()
    state: dict[str, Any] = {"hits": 0, "body": b"warm" * 300, "release": release}
    base = await upstream(aiohttp_server, state)
    app = create_app(make_config(tmp_path, upstreams=(base,)), KEYRING, engines=[])
    client = await aiohttp_client(app)
    node = node_of(app)
    spec = joe("prefetched")
    urls = ["http://edge" + sign(KEYRING, spec)]
    async with client.post("/admin/prefetch", json={"urls": urls}, headers=ADMIN) as resp:
        job = await resp.json()
    await eventually(lambda: state["hits"] == 1)
    fill = node._fills[spec.key]
    assert fill.readers == 1
    release.set()
    await eventually(lambda: node.prefetcher.jobs[job["id"]].state == "finished")
    assert fill.readers == 0
