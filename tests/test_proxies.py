"""Trusted proxies (edge.http.proxies) and the PROXY protocol (edge.http.proxy_protocol).

The PROXY header parser is a pure function, tested and fuzzed on its own. Then a real
nginx in front of a real node, in its two usual setups: `proxy_pass` adding
X-Forwarded-For, and the stream module with `proxy_protocol on`. Players connect from
127.0.0.2 and 127.0.0.3 (both loopback), so a URL bound to 127.0.0.2 must verify for the
first through the proxy and fail for the second, and a forwarding header sent straight
to the node by an untrusted peer must change nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.config import HttpSettings
from nearvoice.edge.http import proxy_protocol
from nearvoice.edge.http.proxies import TrustedProxies
from tests.support import (
    EdgeTestServer,
    make_config,
    make_keyring,
    make_spec,
    payload,
    put_object,
    sign,
)

KEYRING = make_keyring()
BODY = payload(4000, seed=5)

# -- X-Forwarded-For -----------------------------------------------------------------------


def test_forwarded_for_is_read_only_from_trusted_peers() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])
    assert proxies.client("203.0.113.9", ["198.51.100.1"]) == "203.0.113.9"
    assert proxies.client("10.1.1.1", ["198.51.100.1"]) == "198.51.100.1"
    assert proxies.client("10.1.1.1", []) == "10.1.1.1"


def test_the_rightmost_untrusted_hop_is_the_client() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    # A client's forged first entry is to the left of what our proxies appended.
    assert proxies.client("10.0.0.1", ["6.6.6.6, 198.51.100.7, 10.0.0.2"]) == "198.51.100.7"
    assert proxies.client("10.0.0.1", ["6.6.6.6", "198.51.100.7"]) == "198.51.100.7"
    assert proxies.client("10.0.0.1", ["10.0.0.3, 10.0.0.2"]) == "10.0.0.3"


def test_a_garbled_chain_is_not_believed() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client("10.0.0.1", ["198.51.100.7, not-an-ip"]) == "10.0.0.1"


def test_cidrs_match_ipv4_mapped_ipv6() -> None:
    proxies = TrustedProxies(["192.0.2.0/24"])
    assert proxies.trusts("::ffff:192.0.2.10")
    assert proxies.client("::ffff:192.0.2.10", ["::ffff:198.51.100.1"]) == "198.51.100.1"
    assert not proxies.trusts("::ffff:198.51.100.1")
    assert not TrustedProxies([]).trusts("192.0.2.10")


# -- the PROXY header, pure -----------------------------------------------------------------

V2 = proxy_protocol.V2_SIGNATURE


def v2(command: int, family: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return V2 + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def test_v1_tcp4_and_tcp6() -> None:
    header = b"PROXY TCP4 198.51.100.7 10.0.0.1 56324 443\r\n"
    assert proxy_protocol.parse(header + b"GET /") == proxy_protocol.Proxied(
        "198.51.100.7", len(header)
    )
    header6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 443\r\n"
    assert proxy_protocol.parse(header6) == proxy_protocol.Proxied("2001:db8::7", len(header6))
    assert proxy_protocol.parse(b"PROXY UNKNOWN\r\n") == proxy_protocol.Proxied(None, 15)


def test_v2_inet_inet6_and_local() -> None:
    inet = ipaddress.ip_address("198.51.100.7").packed + bytes(4) + struct.pack("!HH", 1, 2)
    header = v2(1, 0x11, inet, tlvs=b"\x04\x00\x01x")
    assert proxy_protocol.parse(header + b"GET") == proxy_protocol.Proxied(
        "198.51.100.7", len(header)
    )
    inet6 = ipaddress.ip_address("2001:db8::7").packed + bytes(16) + bytes(4)
    assert proxy_protocol.parse(v2(1, 0x21, inet6)).client == "2001:db8::7"  # type: ignore[union-attr]
    assert proxy_protocol.parse(v2(0, 0x00, b"")) == proxy_protocol.Proxied(None, 16)


@pytest.mark.parametrize(
    "complete",
    [
        b"PROXY TCP4 198.51.100.7 10.0.0.1 56324 443\r\n",
        v2(1, 0x11, bytes(12)),
    ],
)
def test_every_prefix_of_a_header_needs_more(complete: bytes) -> None:
    for end in range(len(complete)):
        assert proxy_protocol.parse(complete[:end]) is proxy_protocol.NEED_MORE


@pytest.mark.parametrize(
    "bad",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 198.51.100.7 10.0.0.1 56324 443\n",
        b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 198.51.100.7 10.0.0.1 65536 443\r\n",
        b"PROXY TCP4 198.51.100.7 10.0.0.1 01 443\r\n",
        b"PROXY TCP5 198.51.100.7 10.0.0.1 1 2\r\n",
        b"PROXY " + b"A" * 200,
        b"PROXY TCP4 198.51.100.7 10.0.0.1 1\r\n",
        v2(1, 0x11, bytes(4)),  # address block too short
        V2 + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2 + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        V2 + b"\x21\x11\xff\xff",  # longer than allowed
    ],
)
def test_malformed_headers_are_errors(bad: bytes) -> None:
    assert isinstance(proxy_protocol.parse(bad), proxy_protocol.ProxyError)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_result_never_an_exception(data: bytes) -> None:
    result = proxy_protocol.parse(data)
    if isinstance(result, proxy_protocol.Proxied):
        assert 0 < result.consumed <= len(data)
        if result.client is not None:
            ipaddress.ip_address(result.client)


@given(st.ip_addresses(v=4), st.integers(0, 65535), st.binary(max_size=20))
def test_generated_v1_headers_round_trip(address: Any, port: int, rest: bytes) -> None:
    header = f"PROXY TCP4 {address} 10.0.0.1 {port} 443\r\n".encode()
    assert proxy_protocol.parse(header + rest) == proxy_protocol.Proxied(str(address), len(header))


# -- behind a real nginx --------------------------------------------------------------------

NGINX_HTTP = """
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{edge};
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""

NGINX_STREAM = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
stream {{
    server {{
        listen 127.0.0.1:{port};
        proxy_pass 127.0.0.1:{edge};
        proxy_protocol on;
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_nginx(binary: str, prefix: Path, template: str, edge: int) -> Iterator[int]:
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(template.format(prefix=prefix, port=port, edge=edge))
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf),
         "-g", "daemon off;"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail(f"nginx did not start: {(prefix / 'error.log').read_text()}")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def get_from(source: str, port: int, target: str, *fields: str) -> int:
    """The status of GET `target` on 127.0.0.1:`port`, connecting from `source`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    extra = "".join(f"{field}\r\n" for field in fields)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return int(answer.split()[1])


async def _edge(aiohttp_client: AiohttpClient, tmp_path: Path, **http: Any) -> Any:
    config = make_config(tmp_path, http=HttpSettings(trusted_proxies=("127.0.0.1/32",), **http))
    app = create_app(config, KEYRING, engines=[])
    return await aiohttp_client(EdgeTestServer(app))


@pytest.fixture
def nginx(nginx_check_installed: Callable[[], str], tmp_path: Path) -> Callable[[str, int], Any]:
    binary = nginx_check_installed()
    runs: list[Iterator[int]] = []

    def start(template: str, edge: int) -> int:
        run = _run_nginx(binary, tmp_path / f"nginx{len(runs)}", template, edge)
        runs.append(run)
        return next(run)

    yield start  # type: ignore[misc]
    for run in runs:
        next(run, None)


@pytest.mark.nginx
@pytest.mark.parametrize("setup", ["x_forwarded_for", "proxy_protocol"])
async def test_ip_bound_urls_verify_for_the_real_client_behind_nginx(
    aiohttp_client: AiohttpClient, tmp_path: Path, nginx: Callable[[str, int], int], setup: str
) -> None:
    stream = setup == "proxy_protocol"
    client = await _edge(aiohttp_client, tmp_path, proxy_protocol=stream)
    spec = make_spec(f"behind nginx {setup}")
    put_object(client.server.app, spec, BODY)
    url = sign(KEYRING, spec, ip="127.0.0.2/32")
    port = nginx(NGINX_STREAM if stream else NGINX_HTTP, client.port)
    assert await get_from("127.0.0.2", port, url) == 200
    assert await get_from("127.0.0.3", port, url) == 403
    assert await get_from("127.0.0.3", port, url, "X-Forwarded-For: 127.0.0.2") == 403
    # Straight to the node from an untrusted peer: its forwarding header is ignored.
    assert await get_from("127.0.0.3", client.port, url, "X-Forwarded-For: 127.0.0.2") == 403
    if not stream:
        assert await get_from("127.0.0.2", client.port, url) == 200


async def test_the_fast_path_checks_ip_bindings_against_the_proxy_headers_client(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    from tests.support import fast_answers

    client = await _edge(aiohttp_client, tmp_path, proxy_protocol=True)
    spec = make_spec("fast path behind a proxy")
    put_object(client.server.app, spec, BODY)
    mine, other = sign(KEYRING, spec, ip="198.51.100.7/32"), sign(KEYRING, spec, ip="10.9.9.9/32")
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 80\r\n")
    statuses = []
    for target in (mine, mine, other):
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
        statuses.append(int(head.split()[1]))
    writer.close()
    assert statuses == [200, 200, 403]
    assert fast_answers(client) == 1  # the second; the third's refusal is the ordinary path's


async def test_a_trusted_peer_without_its_proxy_header_is_refused(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await _edge(aiohttp_client, tmp_path, proxy_protocol=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"bad_proxy_header"' in answer
