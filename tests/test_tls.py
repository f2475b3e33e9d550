"""TLS on a real node (edge.http.tls) with real clients: Python's ssl through aiohttp and
raw sockets, curl and ffmpeg over https, against certificates from the development CA
(edge.http.devca). The fast path answers over TLS; bodies too large for memory fall back
from sendfile to writes and arrive intact; SIGHUP-style reloads swap the certificate for
new handshakes; mutual TLS refuses clients without a certificate; and an upstream fetch
goes over TLS, verified against the configured CA."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from nearvoice.edge.app import create_app
from nearvoice.edge.config import NodeConfig
from nearvoice.edge.http import devca
from nearvoice.edge.http.fastpath import EdgeRunner, EdgeServer
from nearvoice.edge.http.tls import (
    TlsSettings,
    client_context,
    reload,
    require_https,
    server_context,
)
from nearvoice.edge.keyring import KEYS_ENV
from nearvoice.edge.upstream import UpstreamSettings
from tests.support import make_config, make_keyring, make_spec, payload, put_object, sign

KEYRING = make_keyring()
SMALL = payload(50_000, seed=7)
LARGE = payload(3 * 1024 * 1024 + 17, seed=8)  # above the hot tier's per-object limit


@dataclass
class Pki:
    ca: devca.Issued
    node: devca.Issued
    client: devca.Issued
    directory: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "tls"
    ca = devca.make_ca(directory)
    return Pki(
        ca, devca.issue(ca, directory, "node"), devca.issue(ca, directory, "client"), directory
    )


@dataclass
class Served:
    app: web.Application
    runner: EdgeRunner
    port: int
    context: ssl.SSLContext

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def server(self) -> EdgeServer:
        server = self.runner.server
        assert isinstance(server, EdgeServer)
        return server


async def serve_tls(config: NodeConfig) -> Served:
    app = create_app(config, KEYRING, engines=[])
    runner = EdgeRunner(app)
    await runner.setup()
    context = server_context(config.tls)
    assert context is not None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Served(app, runner, port, context)


@pytest.fixture
async def node(tmp_path: Path, pki: Pki) -> AsyncIterator[Served]:
    tls = TlsSettings(cert=str(pki.node.cert), key=str(pki.node.key))
    served = await serve_tls(make_config(tmp_path / "edge", tls=tls))
    yield served
    await served.runner.cleanup()


def trusting(pki: Pki) -> ssl.SSLContext:
    return client_context(str(pki.ca.cert), "", "")


async def test_aiohttp_over_tls_gets_the_object_and_plain_http_is_refused(
    node: Served, pki: Pki
) -> None:
    spec = make_spec("tls small")
    put_object(node.app, spec, SMALL)
    url = node.base + sign(KEYRING, spec)
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=trusting(pki), headers={"Range": "bytes=10-99"}) as resp:
            assert resp.status == 206
            assert await resp.read() == SMALL[10:100]
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(url, ssl=ssl.create_default_context()):
                pass  # the system store does not know the development CA
        with pytest.raises(aiohttp.ClientError):
            async with session.get(url.replace("https://", "http://")) as resp:
                await resp.read()


async def test_the_fast_path_answers_over_tls(node: Served, pki: Pki) -> None:
    spec = make_spec("tls fast")
    put_object(node.app, spec, SMALL)
    target = sign(KEYRING, spec)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", node.port, ssl=trusting(pki), server_hostname="127.0.0.1"
    )
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=0-9\r\n\r\n".encode()
    for _ in range(3):
        writer.write(head)
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 206 ")
            assert await reader.readexactly(10) == SMALL[:10]
    writer.close()
    assert node.server.fast_answers == 2  # the first request verified the URL


async def test_a_large_file_falls_back_from_sendfile_over_tls(node: Served, pki: Pki) -> None:
    spec = make_spec("tls large")
    put_object(node.app, spec, LARGE)
    url = node.base + sign(KEYRING, spec)
    async with aiohttp.ClientSession() as session, session.get(url, ssl=trusting(pki)) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(LARGE).digest()


async def test_curl_over_tls(node: Served, pki: Pki) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is a test dependency (scripts/system-deps.sh)"
    spec = make_spec("tls curl")
    put_object(node.app, spec, SMALL)
    url = node.base + sign(KEYRING, spec)
    proc = await asyncio.create_subprocess_exec(
        curl, "-sS", "--http1.1", "--cacert", str(pki.ca.cert), "-r", "0-999", url,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out == SMALL[:1000]


async def test_ffmpeg_decodes_over_https(node: Served, pki: Pki, tmp_path: Path) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None, "ffmpeg is a test dependency (scripts/system-deps.sh)"
    spec = make_spec("tls ffmpeg")
    wav = _wav(24000, 24000)
    put_object(node.app, spec, wav, content_type="audio/wav")
    url = node.base + sign(KEYRING, spec)
    proc = await asyncio.create_subprocess_exec(
        ffmpeg, "-nostdin", "-v", "error", "-ca_file", str(pki.ca.cert), "-tls_verify", "1",
        "-i", url, "-f", "s16le", "-",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert out == wav[44:]


def _wav(rate: int, samples: int) -> bytes:
    import struct

    data = payload(samples * 2, seed=9)
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16,
        b"data", len(data),
    )  # fmt: skip
    return header + data


def _peer_serial(port: int, pki: Pki) -> int:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        trusting(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_reloading_swaps_the_certificate_for_new_handshakes(
    node: Served, pki: Pki, tmp_path: Path
) -> None:
    before = await asyncio.to_thread(_peer_serial, node.port, pki)
    renewed = devca.issue(pki.ca, pki.directory, "node")  # rewrites the same files
    assert renewed.cert == pki.node.cert
    settings = TlsSettings(cert=str(renewed.cert), key=str(renewed.key))
    assert reload(node.context, settings)
    after = await asyncio.to_thread(_peer_serial, node.port, pki)
    assert after != before
    assert after == x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    assert not reload(node.context, TlsSettings(cert=str(broken), key=str(renewed.key)))
    assert await asyncio.to_thread(_peer_serial, node.port, pki) == after  # kept


async def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path: Path, pki: Pki) -> None:
    tls = TlsSettings(cert=str(pki.node.cert), key=str(pki.node.key), client_ca=str(pki.ca.cert))
    served = await serve_tls(make_config(tmp_path / "m", tls=tls))
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(served.base + "/healthz", ssl=trusting(pki)) as resp:
                    await resp.read()
            with_cert = client_context(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key))
            async with session.get(served.base + "/healthz", ssl=with_cert) as resp:
                assert resp.status == 200
    finally:
        await served.runner.cleanup()


async def test_an_edge_fetches_from_a_tls_upstream_with_mutual_tls(
    tmp_path: Path, pki: Pki
) -> None:
    upstream_tls = TlsSettings(
        cert=str(pki.node.cert), key=str(pki.node.key), client_ca=str(pki.ca.cert)
    )
    shield = await serve_tls(make_config(tmp_path / "shield", tls=upstream_tls))
    spec = make_spec("fetched over tls")
    put_object(shield.app, spec, SMALL)
    settings = UpstreamSettings(
        ca=str(pki.ca.cert), cert=str(pki.client.cert), key=str(pki.client.key), require_tls=True
    )
    edge_config = make_config(tmp_path / "edge", upstreams=(shield.base,), upstream=settings)
    edge_app = create_app(edge_config, KEYRING, engines=[])
    runner = EdgeRunner(edge_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}" + sign(KEYRING, spec)
            async with session.get(url) as resp:
                assert resp.status == 200
                assert await resp.read() == SMALL
    finally:
        await runner.cleanup()
        await shield.runner.cleanup()


def test_require_tls_refuses_plain_upstreams() -> None:
    require_https(("https://a:1", "HTTPS://b"))
    with pytest.raises(ValueError, match="http://c"):
        require_https(("https://a:1", "http://c"))


def test_half_a_tls_configuration_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError):
        server_context(TlsSettings(cert=str(pki.node.cert)))
    assert server_context(TlsSettings()) is None


def _wait_serial(port: int, pki: Pki, differs_from: int | None, limit: float = 60.0) -> int:
    """The certificate serial new connections get, polled until the node answers (and,
    with `differs_from`, until every one of several connections shows another one)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            serials = {_peer_serial(port, pki) for _ in range(6)}
        except OSError:
            serials = set()
        if serials and (differs_from is None or differs_from not in serials):
            assert len(serials) == 1, serials
            return serials.pop()
        if time.monotonic() > deadline:
            pytest.fail(f"no certificate change on port {port} within {limit} s: {serials}")
        time.sleep(0.1)


def test_sighup_reloads_the_certificate_in_every_worker(tmp_path: Path, pki: Pki) -> None:
    port = _free_port()
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[tls]\ncert = "{pki.node.cert}"\nkey = "{pki.node.key}"\n[synth]\nenabled = false\n'
    )
    env = {**os.environ, KEYS_ENV: "test1:" + "s" * 40}
    log = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nearvoice", "edge", "--config", str(config), "--port", str(port),
         "--workers", "2", "--data-dir", str(tmp_path / "data")],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        before = _wait_serial(port, pki, None)
        devca.issue(pki.ca, pki.directory, "node")
        proc.send_signal(signal.SIGHUP)
        after = _wait_serial(port, pki, before)
        assert after == x509.load_pem_x509_certificate(pki.node.cert.read_bytes()).serial_number
        assert proc.poll() is None  # reloaded, not restarted
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert "TLS certificate reloaded" in (tmp_path / "stderr.log").read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_tls_handshake_that_never_ends_is_cut_off(tmp_path: Path, pki: Pki) -> None:
    port = _free_port()
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[tls]\ncert = "{pki.node.cert}"\nkey = "{pki.node.key}"\n'
        "[http]\nheader_timeout = 1.0\n[synth]\nenabled = false\n"
    )
    env = {**os.environ, KEYS_ENV: "test1:" + "s" * 40}
    log = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nearvoice", "edge", "--config", str(config), "--port", str(port),
         "--data-dir", str(tmp_path / "data")],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        _wait_serial(port, pki, None)  # up, and completing handshakes
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"\x16\x03\x01\x00\xc8\x01")  # the start of a ClientHello, no more
            raw.settimeout(15)  # the default handshake timeout is 60 s
            started = time.monotonic()
            assert raw.recv(1024) == b""  # closed by the node
            assert time.monotonic() - started < 15
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
