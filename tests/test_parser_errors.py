"""Requests aiohttp's parser refuses, on a real node over raw sockets: every answer is the
contract's JSON over HTTP/1.1 with the right status, logged at WARNING without a
traceback; a head that never ends gets 408 (slowloris); one address cannot hold more than
`max_connections_per_client` connections; and nothing refused reaches the cache."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.config import HttpSettings
from nearvoice.edge.http.protocol import REJECTION_LOG_RATE
from tests.support import EdgeTestServer, make_config, make_keyring, node_of

Client = TestClient[Any, Any]
TIMEOUT = 10.0


async def start(aiohttp_client: AiohttpClient, tmp_path: Path, **http: Any) -> Client:
    app = create_app(make_config(tmp_path, http=HttpSettings(**http)), make_keyring(), engines=[])
    return await aiohttp_client(EdgeTestServer(app))


async def exchange(client: Client, raw: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Sends `raw` on a fresh connection; (status line, fields, body) of the answer."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].split(b"\r\n")
            fields = {
                n.decode().lower(): v.decode()
                for n, _, v in (line.partition(b": ") for line in lines)
            }
            body = await reader.readexactly(int(fields.get("content-length", "0")))
        return status_line, fields, body
    finally:
        writer.close()


CASES = {
    "nul_in_target": (b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "obs_text_in_target": (b"GET /a\xffb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "long_request_line": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "long_field": (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    "many_fields": (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X%d: a\r\n" % i for i in range(1000))
        + b"\r\n",
        431,
    ),
    "unknown_method": (b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "bare_lf": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),
    "bare_cr_speech": (b"GET /v1/speech/" + b"a" * 64 + b".wav?s=x HTTP/1.1\r\r", 400),
    "http_2_0": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_parser_refusals_are_json_over_http11_with_the_right_status(
    aiohttp_client: AiohttpClient, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw, status = CASES[case]
    client = await start(aiohttp_client, tmp_path)
    with caplog.at_level(logging.DEBUG):
        status_line, fields, body = await exchange(client, raw)
    assert status_line.startswith(b"HTTP/1.1 %d " % status), status_line
    assert fields["content-type"].startswith("application/json")
    assert fields["connection"] == "close"
    answer = json.loads(body)
    assert set(answer) == {"error", "message"}
    if status == 405:
        assert fields["allow"] == "GET, HEAD, POST"
    refusals = [r for r in caplog.records if r.getMessage().startswith("rejected request")]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.WARNING
    assert refusals[0].exc_info is None and refusals[0].exc_text is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(refusals[0].getMessage()) < 300


async def test_rejection_log_lines_are_rate_limited(
    aiohttp_client: AiohttpClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(aiohttp_client, tmp_path)
    sent = int(REJECTION_LOG_RATE * 3)
    with caplog.at_level(logging.WARNING):
        for _ in range(sent):
            status_line, _, _ = await exchange(client, CASES["bare_lf"][0])
            assert status_line.startswith(b"HTTP/1.1 400 ")
    lines = [r for r in caplog.records if r.getMessage().startswith("rejected request")]
    assert REJECTION_LOG_RATE <= len(lines) < sent


async def test_a_head_that_never_ends_gets_408_and_a_closed_connection(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, header_timeout=0.5)
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # and never another byte
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        answer = await reader.read()  # until the server closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"


async def test_a_silent_connection_is_closed_without_an_answer(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, header_timeout=0.5)
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    async with asyncio.timeout(TIMEOUT):
        assert await reader.read() == b""  # closed, no 408 to mistake for an answer
    writer.close()


async def test_a_slow_but_complete_head_within_the_timeout_is_answered(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, header_timeout=5.0)
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
        writer.write(part)
        await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")


async def test_connections_per_client_are_capped(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, max_connections_per_client=3)
    assert client.port is not None
    held = [await asyncio.open_connection("127.0.0.1", client.port) for _ in range(3)]
    # Each of the three is answered, so the server has counted all of them.
    for reader, writer in held:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    async with asyncio.timeout(TIMEOUT):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "too_many_connections"
    for _, other in held:
        other.close()


async def test_connections_from_trusted_proxies_are_not_capped(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await start(
        aiohttp_client, tmp_path, max_connections_per_client=1, trusted_proxies=("127.0.0.0/8",)
    )
    assert client.port is not None
    held = [await asyncio.open_connection("127.0.0.1", client.port) for _ in range(3)]
    for reader, writer in held:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()


# -- fuzzing request heads -----------------------------------------------------------------

_TOKEN = st.sampled_from(["GET", "HEAD", "POST", "PUT", "FROB", "G@T", "", "get"])
_TARGET = st.one_of(
    st.sampled_from(["/", "/healthz", "/v1/speech/" + "a" * 64 + ".wav?s=x", "*", "//"]),
    st.binary(max_size=40).map(lambda b: "/" + b.decode("latin-1")),
)
_FIELD = st.tuples(
    st.binary(min_size=0, max_size=12).map(lambda b: b.decode("latin-1")),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
_EOL = st.sampled_from(["\r\n", "\n", "\r"])


EXPECTED = {200, 400, 403, 404, 405, 410, 411, 413, 414, 431, 501, 505}
"""What a fuzzed head may get: a route's answer, or a refusal; never a 5xx of our own."""


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    eol = draw(_EOL)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", ""]))
    lines = [f"{draw(_TOKEN)} {draw(_TARGET)} {version}".rstrip()]
    lines += [f"{name}: {value}" for name, value in draw(st.lists(_FIELD, max_size=4))]
    return (eol.join(lines) + eol + eol).encode("latin-1")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=heads())
def test_fuzzed_heads_get_json_and_never_touch_the_cache(tmp_path_factory: Any, raw: bytes) -> None:
    asyncio.run(_fuzz_one(tmp_path_factory.mktemp("fuzz"), raw))


async def _fuzz_one(path: Path, raw: bytes) -> None:
    app = create_app(make_config(path), make_keyring(), engines=[])
    async with TestClient(EdgeTestServer(app)) as client:
        node = node_of(app)
        lookups = 0
        original = node.lookup

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal lookups
            lookups += 1
            return await original(*args, **kwargs)

        node.lookup = counted  # type: ignore[method-assign]
        try:
            status_line, fields, body = await exchange(client, raw)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return  # the server closed without an answer (e.g. HTTP/2.0 preface-like)
        status = int(status_line.split()[1])
        assert status in EXPECTED, (raw, status_line)
        if status >= 400:
            assert fields.get("content-type", "").startswith("application/json"), (raw, status_line)
            assert "error" in json.loads(body)
            assert lookups == 0
        # HTTP/1.1 answers, but to an HTTP/1.0 request a route answers in HTTP/1.0.
        http10 = raw.split(b"\n", 1)[0].rstrip(b"\r").endswith(b" HTTP/1.0")
        assert status_line.startswith(b"HTTP/1.1 ") or http10, (raw, status_line)


async def test_a_tier_that_signed_as_a_node_is_not_capped(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    from nearvoice.edge.nodeauth import NODE_HEADER, sign_node_request
    from tests.support import make_spec, sign

    keyring = make_keyring()
    client = await start(aiohttp_client, tmp_path, max_connections_per_client=1)
    assert client.port is not None
    target = sign(keyring, make_spec("node peer"))
    base = f"http://127.0.0.1:{client.port}"
    value = sign_node_request(keyring, "GET", target, base)
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\n{NODE_HEADER}: {value}\r\n\r\n".encode()
    status_line, _, _ = await exchange(client, head)
    assert status_line.startswith(b"HTTP/1.1 503 ")  # no engine: no_renderer, but vouched
    held = [await asyncio.open_connection("127.0.0.1", client.port) for _ in range(3)]
    for reader, writer in held:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()
