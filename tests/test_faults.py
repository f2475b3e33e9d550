"""Faults lose nothing and never leave a half-written object servable.

Every fault here is real: processes that die mid-write (os._exit, SIGKILL), a disk that
is really full (a tiny tmpfs, or RLIMIT_FSIZE in a separate node process), a client that
really hangs up mid-response, and a value file really truncated on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import soundfile
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.hot import HotSettings
from nearvoice.edge.cache.store import DiskStore, Outcome, StoreSettings
from nearvoice.edge.config import HttpSettings
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.upstream import CHECKSUM_HEADER
from tests.support import (
    KID,
    SECRET,
    eventually,
    make_config,
    make_keyring,
    make_spec,
    metric_from,
    node_of,
    payload,
    put_object,
    scrape,
    scrape_until,
    sign,
    value_files,
    wait_process_ready,
    wait_ready,
)

Client = TestClient[Any, Any]
REPO = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 60.0
BIG_OBJECT = 32 * 1024**2  # more than loopback socket buffers take in one go


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring()


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def staging_files(directory: Path) -> list[Path]:
    return sorted((directory / "staging").iterdir())


def verify_all(store: DiskStore) -> dict[str, bytes]:
    """Opens every object the store will serve and checks it against its metadata."""
    bodies: dict[str, bytes] = {}
    for key in list(store._cache.iterkeys()):
        opened = store.open(key)
        assert opened.outcome is Outcome.HIT, key
        assert opened.meta is not None
        with os.fdopen(opened.fd, "rb") as f:
            body = f.read()
        assert len(body) == opened.meta.length, key
        assert hashlib.sha256(body).hexdigest() == opened.meta.sha256, key
        bodies[key] = body
    return bodies


# -- (1) a crash mid-write ----------------------------------------------------------------

_STAGE_THEN_DIE = """
import os, sys
from pathlib import Path
from nearvoice.edge.cache.store import DiskStore, StoreSettings

store = DiskStore(Path(sys.argv[1]), StoreSettings())
staged = store.stage(os.urandom(1 << 20))
print(staged.path, flush=True)
os._exit(1)  # dies between stage() and commit(), like a power cut
"""


@pytest.mark.slow
def test_crash_between_stage_and_commit_leaves_a_miss(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    done = run_child(_STAGE_THEN_DIE, str(directory))
    assert done.returncode == 1, done.stderr
    orphan = Path(done.stdout.strip())
    assert orphan.exists()  # the crash really left a staged, uncommitted body
    assert orphan.parent == directory / "staging"

    store = DiskStore(directory, StoreSettings())
    try:
        assert staging_files(directory) == []
        assert store.count() == 0
        assert store.open(make_spec().key).outcome is Outcome.MISS
    finally:
        store.close()


_WRITE_FOREVER = """
import hashlib, os, sys, time
from pathlib import Path
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.cache.store import DiskStore, StoreSettings
from nearvoice.edge.policy import Policy

store = DiskStore(Path(sys.argv[1]), StoreSettings())
size = int(sys.argv[2])
i = 0
while True:
    body = os.urandom(size)
    key = hashlib.sha256(b"object-%d" % i).hexdigest()
    meta = ObjectMeta(
        key=key, content_type="audio/wav", length=size, etag=etag_for(key),
        sha256=hashlib.sha256(body).hexdigest(), policy=Policy.HOT,
        stored_at=time.time(), ttl=3600,
    )
    store.put(meta, body)
    print(key, flush=True)
    i += 1
"""


@pytest.mark.slow
def test_sigkill_while_writing_loses_no_committed_object(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    size = 16 * 1024**2
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WRITE_FOREVER), str(directory), str(size)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as child:
        assert child.stdout is not None
        committed = [child.stdout.readline().strip() for _ in range(2)]
        # Kill it while the next body is being written into staging.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            parts = list((directory / "staging").glob("*.part"))
            if any(p.stat().st_size > 0 for p in parts if p.exists()):
                break
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    committed += [line for line in rest.splitlines() if line]
    assert all(len(key) == 64 for key in committed), committed

    store = DiskStore(directory, StoreSettings())
    try:
        assert staging_files(directory) == []
        bodies = verify_all(store)
        # Everything reported committed survived, whole; at most one more object (committed
        # just before the kill, not yet reported) is there, and it is whole too.
        assert set(committed) <= set(bodies)
        assert len(bodies) - len(committed) in (0, 1)
        assert all(len(body) == size for body in bodies.values())
    finally:
        store.close()


# -- (2) a full disk ----------------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(where: Path) -> Iterator[None]:
    """Mounts a 4 KiB tmpfs over `where`; skips when this host forbids mounting."""
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the RLIMIT test covers it")
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.slow
async def test_full_disk_still_delivers_and_stores_nothing(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    app = create_app(make_config(tmp_path), keyring)
    client = await aiohttp_client(app)
    await wait_ready(client)
    node = node_of(app)
    spec = make_spec("The disk is full, but the listener still hears this.")
    url = sign(keyring, spec)
    with tiny_tmpfs(node.store.staging):
        async with client.get(url) as resp:
            assert resp.status == 200
            first = await resp.read()  # a short chunked body would raise here
            assert CHECKSUM_HEADER not in resp.headers  # answered in flight: no digest yet
        audio, rate = soundfile.read(io.BytesIO(first))
        assert rate == 24000 and len(audio) > 0
        # The body's last byte leaves before the commit is tried: wait for its failure.
        await scrape_until(client, lambda t: metric_from(t, "nearvoice_store_errors_total") == 1)
        assert not node.store.contains(spec.key)
        assert node.store.count() == 0
        assert len(node.hot) == 0
        assert list(node.store.staging.iterdir()) == []

        async with client.get(url) as resp:  # not stored, so it renders again
            assert resp.status == 200
            assert await resp.read() == first
        text = await scrape(client)
        assert metric_from(text, "nearvoice_synth_total", engine="hibari") == 2
        assert metric_from(text, "nearvoice_requests_total", result="miss") == 2
        assert metric_from(text, "nearvoice_requests_total", result="hit") == 0


async def _until_metric(
    session: aiohttp.ClientSession, base: str, sample: str, value: float
) -> str:
    """The node's metrics once `sample` reached `value` (it is recorded after the last
    byte of a body of known length has left)."""
    async with asyncio.timeout(CHILD_TIMEOUT):
        while True:
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
            if metric_from(text, sample) >= value:
                return text
            await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_NODE_WITH_FSIZE_LIMIT = """
import resource, runpy, signal, sys
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
sys.argv = ["nearvoice", *sys.argv[2:]]
runpy.run_module("nearvoice.edge.cli", run_name="__main__")
"""

LONG_TEXT = (
    "A file size limit makes every write past it fail, the way a full disk does. "
    "This line is long enough that its rendered audio is larger than that limit, "
    "so the edge cannot keep it, and must still deliver every byte to the listener."
)


@pytest.mark.slow
async def test_write_limit_still_delivers_and_stores_nothing(
    tmp_path: Path, keyring: Keyring
) -> None:
    """The same fault without mount privileges: a node process under RLIMIT_FSIZE."""
    limit = 256 * 1024
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    data = tmp_path / "node"
    env = {**os.environ, "NEARVOICE_KEYS": f"{KID}:{SECRET}"}
    argv = ["edge", "--port", str(port), "--data-dir", str(data)]
    log_path = tmp_path / "node.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            textwrap.dedent(_NODE_WITH_FSIZE_LIMIT),
            str(limit),
            *argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_process_ready(session, base, proc, CHILD_TIMEOUT)
            url = base + sign(keyring, make_spec(LONG_TEXT))
            async with session.get(url) as resp:
                assert resp.status == 200
                first = await resp.read()  # a short chunked body would raise here
                assert CHECKSUM_HEADER not in resp.headers  # answered in flight
            assert len(first) > limit  # the body really could not be written
            assert soundfile.info(io.BytesIO(first)).frames > 0
            await _until_metric(session, base, "nearvoice_store_errors_total", 1)
            async with session.get(url) as resp:
                assert resp.status == 200
                assert await resp.read() == first
            text = await _until_metric(session, base, "nearvoice_store_errors_total", 2)
        assert metric_from(text, "nearvoice_store_errors_total") == 2
        assert metric_from(text, "nearvoice_synth_total", engine="hibari") == 2
        assert metric_from(text, "nearvoice_cache_objects") == 0
        assert metric_from(text, "nearvoice_requests_total", result="hit") == 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert list((data / "cache" / "staging").iterdir()) == []
    assert list((data / "cache").rglob("*.val")) == []


# -- (3) a client that hangs up -----------------------------------------------------------


async def _hang_up_mid_response(client: Client, url: str) -> int:
    """Sends a GET on a raw socket, reads a little of the body, then resets the
    connection. Returns how many bytes it read."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET {url} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    got = len(await reader.readexactly(64 * 1024))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()  # with SO_LINGER 0 the close sends RST: a hard hang-up
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return got


@pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "no-sendfile"])
async def test_client_hang_up_releases_the_descriptor(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring, use_sendfile: bool
) -> None:
    config = make_config(
        tmp_path,
        hot=HotSettings(max_object_bytes=1024),
        http=HttpSettings(sendfile=use_sendfile),
    )
    app = create_app(config, keyring, engines=[])
    client = await aiohttp_client(app)
    spec = make_spec()
    body = payload(BIG_OBJECT, seed=3)
    put_object(app, spec, body)
    url = sign(keyring, spec)
    node = node_of(app)

    got = await _hang_up_mid_response(client, url)
    assert got < len(body)
    entry = node.hot.get(spec.key, time.time())
    assert entry is not None and entry.file is not None
    file = entry.file
    await eventually(lambda: file.refs == 1)  # only the hot tier's own reference is left

    async with client.get(url) as resp:  # the server is fine and the fd still valid
        assert resp.status == 200
        assert hashlib.sha256(await resp.read()).digest() == hashlib.sha256(body).digest()
    assert entry.file.refs == 1
    os.fstat(entry.file.fd)  # still open: the hot tier's reference was not released


async def test_client_hang_up_on_a_range_then_ranges_still_work(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    config = make_config(tmp_path, hot=HotSettings(max_object_bytes=1024))
    app = create_app(config, keyring, engines=[])
    client = await aiohttp_client(app)
    spec = make_spec()
    body = payload(BIG_OBJECT, seed=4)
    put_object(app, spec, body)
    url = sign(keyring, spec)
    await _hang_up_mid_response(client, url)
    for _ in range(3):
        async with client.get(url, headers={"Range": "bytes=1000-1999"}) as resp:
            assert resp.status == 206
            assert await resp.read() == body[1000:2000]


# -- (4) a corrupted value on disk --------------------------------------------------------


def _truncate_only_value(app: web.Application) -> None:
    files = value_files(app)
    assert len(files) == 1, files
    size = files[0].stat().st_size
    os.truncate(files[0], size // 2)


@pytest.mark.parametrize("hot_limit", [2 * 1024**2, 1024], ids=["memory", "descriptor"])
async def test_truncated_value_is_never_served(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring, hot_limit: int
) -> None:
    config = make_config(tmp_path, hot=HotSettings(max_object_bytes=hot_limit))
    app = create_app(config, keyring, engines=[])
    client = await aiohttp_client(app)
    spec = make_spec()
    put_object(app, spec, payload(100_000))
    _truncate_only_value(app)

    async with client.get(sign(keyring, spec)) as resp:
        assert resp.status != 200
        assert (await resp.json())["error"] == "no_renderer"
    assert not node_of(app).store.contains(spec.key)  # the bad row is dropped
    assert len(node_of(app).hot) == 0


@pytest.mark.slow
async def test_truncated_value_is_rendered_again_after_restart(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    spec = make_spec("A line that is rendered twice.")
    url = sign(keyring, spec)

    first_app = create_app(make_config(tmp_path), keyring)
    first = await aiohttp_client(first_app)
    await wait_ready(first)
    async with first.get(url) as resp:
        assert resp.status == 200
        original = await resp.read()
    # The last byte can reach the client just before the commit: truncate what was stored.
    await eventually(lambda: node_of(first_app).store.contains(spec.key))
    _truncate_only_value(first_app)
    await first.close()

    second_app = create_app(make_config(tmp_path), keyring)
    second = await aiohttp_client(second_app)
    await wait_ready(second)
    async with second.get(url) as resp:
        assert resp.status == 200
        assert CHECKSUM_HEADER not in resp.headers  # rendered again, answered in flight
        assert await resp.read() == original
    await eventually(lambda: node_of(second_app).store.contains(spec.key))
    text = await scrape(second)
    assert metric_from(text, "nearvoice_synth_total", engine="hibari") == 1
    assert metric_from(text, "nearvoice_requests_total", result="miss") == 1
    assert node_of(second_app).store.contains(spec.key)  # stored again, whole
