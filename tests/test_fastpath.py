"""The fast path (edge/http/fastpath.py) on a real loopback server, with raw sockets.

Two edges hold the same object under the same signed URL, one with `[http] fast_path` on
and one with it off. A request the fast path takes must get byte for byte the answer the
ordinary path gives (status line, every header and its order, body; only Date may
differ), and its server's `fast_answers` counter proves which path answered. Requests it
must not take (conditional, HEAD, Connection: close, HTTP/1.0, pipelined, unknown fields,
multipart, 416, expired or foreign-address URLs) go to aiohttp and still get the ordinary
answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge import activity
from nearvoice.edge.activity import Activity
from nearvoice.edge.app import create_app
from nearvoice.edge.cache.meta import etag_for
from nearvoice.edge.config import HttpSettings
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.fastpath import PREPARED_PER_ENTRY, EdgeServer
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from tests.support import (
    EdgeTestServer,
    fast_answers,
    make_config,
    make_keyring,
    make_spec,
    metric,
    payload,
    put_object,
    sign,
)

Client = TestClient[Any, Any]
LENGTH = 100_003
BODY = payload(LENGTH, seed=11)
STORED_AT = float(int(time.time()) - 3600)  # the same Last-Modified on both edges
READ_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Answer:
    status_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # in order, Date left out
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)


def head_of(
    target: str,
    *fields: tuple[str, str],
    method: str = "GET",
    version: str = "HTTP/1.1",
    host: bool = True,
) -> bytes:
    lines = [f"{method} {target} {version}"]
    if host:
        lines.append("Host: 127.0.0.1")
    lines += [f"{name}: {value}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_answer(reader: asyncio.StreamReader, method: str = "GET") -> Answer:
    async with asyncio.timeout(READ_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].split(b"\r\n")
        headers = tuple(
            (name, value)
            for name, _, value in (line.partition(b": ") for line in lines)
            if name.lower() != b"date"
        )
        answer = Answer(status_line, headers, b"")
        length = int(answer.header(b"Content-Length") or b"0")
        if method == "HEAD" or answer.status == 304:
            return answer
        return Answer(status_line, headers, await reader.readexactly(length))


class Connection:
    """One raw keep-alive connection to an edge."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, client: Client) -> Connection:
        assert client.port is not None
        return cls(*await asyncio.open_connection("127.0.0.1", client.port))

    async def send(self, *segments: bytes) -> None:
        """Each segment in its own write, the next only after the server has read it."""
        for i, segment in enumerate(segments):
            if i:
                await asyncio.sleep(0.05)
            self.writer.write(segment)
            await self.writer.drain()

    async def ask(self, head: bytes, method: str = "GET") -> Answer:
        await self.send(head)
        return await read_answer(self.reader, method)

    async def closed_by_server(self) -> bool:
        async with asyncio.timeout(READ_TIMEOUT):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


@dataclass(slots=True)
class Edge:
    app: web.Application
    client: Client

    @property
    def fast(self) -> int:
        return fast_answers(self.client)

    async def ask(self, head: bytes, method: str = "GET") -> Answer:
        """One request on a fresh connection."""
        conn = await Connection.open(self.client)
        try:
            return await conn.ask(head, method)
        finally:
            conn.close()


@dataclass(slots=True)
class Pair:
    fast: Edge
    slow: Edge
    url: str
    spec: Spec
    keyring: Keyring

    async def both(self, head: bytes, method: str = "GET") -> tuple[Answer, Answer]:
        return await self.fast.ask(head, method), await self.slow.ask(head, method)


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring()


async def start_edge(
    aiohttp_client: AiohttpClient,
    path: Path,
    keyring: Keyring,
    spec: Spec,
    *,
    http: HttpSettings,
    **runner_kwargs: Any,
) -> Edge:
    app = create_app(make_config(path, http=http), keyring, engines=[])
    put_object(app, spec, BODY, stored_at=STORED_AT)
    client = await aiohttp_client(EdgeTestServer(app, **runner_kwargs))
    return Edge(app, client)


@pytest.fixture
async def pair(aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring) -> Pair:
    """Both edges, their memos and hot tiers warmed by one request for the URL."""
    spec = make_spec()
    fast = await start_edge(
        aiohttp_client, tmp_path / "fast", keyring, spec, http=HttpSettings(fast_path=True)
    )
    slow = await start_edge(
        aiohttp_client, tmp_path / "slow", keyring, spec, http=HttpSettings(fast_path=False)
    )
    url = sign(keyring, spec)
    for edge in (fast, slow):
        assert (await edge.ask(head_of(url))).status == 200
    assert fast.fast == 0, "a URL's first request is verified on the ordinary path"
    return Pair(fast, slow, url, spec, keyring)


async def assert_fast_and_identical(pair: Pair, head: bytes) -> Answer:
    before = pair.fast.fast
    ours, theirs = await pair.both(head)
    assert pair.fast.fast == before + 1, "the fast path did not answer"
    assert ours == theirs
    return ours


async def assert_fallback_and_identical(pair: Pair, head: bytes, method: str = "GET") -> Answer:
    before = pair.fast.fast
    ours, theirs = await pair.both(head, method)
    assert pair.fast.fast == before, "the fast path answered a request it must hand on"
    assert without_boundary(ours) == without_boundary(theirs)
    return ours


def without_boundary(answer: Answer) -> Answer:
    """A multipart answer with its (random) boundary blanked out."""
    content_type = answer.header(b"Content-Type") or b""
    if not content_type.startswith(b"multipart/"):
        return answer
    boundary = content_type.partition(b"boundary=")[2]
    headers = tuple((n, v.replace(boundary, b"<b>")) for n, v in answer.headers)
    return Answer(answer.status_line, headers, answer.body.replace(boundary, b"<b>"))


# -- the switch --------------------------------------------------------------------------------


async def test_the_switch_off_leaves_aiohttps_request_path(pair: Pair) -> None:
    for edge, fast in ((pair.slow, False), (pair.fast, True)):
        server = edge.client.server.handler
        assert isinstance(server, EdgeServer)
        assert server.fast is fast


async def test_access_logging_keeps_the_fast_path_on(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    http = HttpSettings(fast_path=True, access_log=True)
    edge = await start_edge(aiohttp_client, tmp_path, keyring, make_spec(), http=http)
    server = edge.client.server.handler
    assert isinstance(server, EdgeServer)
    assert server.fast


async def test_every_answer_counts_as_traffic_fast_or_not(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests close together make a render among them not alone (edge.activity),
    whichever path answered them: the fast path's hits report themselves, the app's
    requests pass the `seen` middleware."""
    for edge, fast in ((pair.fast, 1), (pair.slow, 0)):
        node = Activity()
        monkeypatch.setattr(activity, "RENDERS", node)
        before = edge.fast if fast else 0
        assert node.alone()
        assert (await edge.ask(head_of(pair.url))).status == 200
        assert node.alone()  # one request: a render's own
        assert (await edge.ask(head_of(pair.url))).status == 200
        assert not node.alone()
        assert (edge.fast if fast else 0) == before + 2 * fast


# -- answers the fast path gives, identical to the ordinary path's -----------------------------

IDENTICAL_RANGES = [
    pytest.param(None, id="no-range"),
    pytest.param("bytes=0-99", id="first-100"),
    pytest.param("bytes=65536-131071", id="64k-slice"),
    pytest.param("bytes=500-", id="open-ended"),
    pytest.param("bytes=0-", id="open-from-zero"),
    pytest.param("bytes=-100", id="suffix"),
    pytest.param(f"bytes={LENGTH - 1}-{LENGTH - 1}", id="last-byte"),
    pytest.param("bytes=99000-200000", id="last-pos-past-end"),
    pytest.param("Bytes=0-1", id="capitalized-unit"),
    pytest.param("bytes= 3-4", id="spaces"),
    pytest.param("   bytes=0-9", id="leading-spaces"),
    pytest.param("items=0-1", id="unknown-unit-ignored"),
    pytest.param("bytes=0-1,1-", id="overlap-above-length-ignored"),
]


@pytest.mark.parametrize("range_value", IDENTICAL_RANGES)
async def test_fast_answer_is_identical(pair: Pair, range_value: str | None) -> None:
    fields = [("Range", range_value)] if range_value is not None else []
    await assert_fast_and_identical(pair, head_of(pair.url, *fields))


async def test_fast_answer_sends_the_bytes_asked_for(pair: Pair) -> None:
    answer = await assert_fast_and_identical(pair, head_of(pair.url, ("Range", "bytes=10-19")))
    assert answer.status == 206
    assert answer.body == BODY[10:20]
    assert answer.header(b"Content-Range") == f"bytes 10-19/{LENGTH}".encode()


async def test_fast_answer_with_player_fields_is_identical(pair: Pair) -> None:
    head = head_of(
        pair.url,
        ("User-Agent", "Lavf/60.3.100"),
        ("Accept", "*/*"),
        ("Accept-Encoding", "identity"),
        ("Accept-Language", "en-GB,en;q=0.9"),
        ("Connection", "Keep-Alive"),
        ("range", "bytes=0-1023"),
    )
    await assert_fast_and_identical(pair, head)


async def test_fast_answer_follows_the_urls_policy(pair: Pair) -> None:
    url = sign(pair.keyring, pair.spec, policy=Policy.PERSONAL)
    for edge in (pair.fast, pair.slow):
        await edge.ask(head_of(url))  # verifies the new URL on the ordinary path
    answer = await assert_fast_and_identical(pair, head_of(url, ("Range", "bytes=0-9")))
    assert answer.header(b"Cache-Control") == b"private, max-age=3600"


async def test_request_without_host_goes_to_aiohttp(pair: Pair) -> None:
    """RFC 9112 section 3.2: an HTTP/1.1 request without Host is a 400."""
    answer = await assert_fallback_and_identical(pair, head_of(pair.url, host=False))
    assert answer.status == 400


# -- requests handed to aiohttp ---------------------------------------------------------------

FALLBACK_FIELDS = [
    pytest.param([("If-None-Match", '"{etag}"')], id="if-none-match"),
    pytest.param([("If-Match", '"nope"')], id="if-match"),
    pytest.param([("If-Modified-Since", "Sun, 06 Nov 2044 08:49:37 GMT")], id="if-modified"),
    pytest.param([("If-Unmodified-Since", "Sun, 06 Nov 1994 08:49:37 GMT")], id="if-unmodified"),
    pytest.param([("Range", "bytes=0-1"), ("If-Range", '"{etag}"')], id="if-range"),
    pytest.param([("Range", "bytes=0-9,20-29")], id="multipart"),
    pytest.param([("Range", f"bytes={LENGTH}-")], id="416"),
    pytest.param([("Range", "bytes=0-1"), ("Range", "bytes=3-4")], id="repeated-range"),
    pytest.param([("X-Custom", "1")], id="unknown-field"),
    pytest.param([("Connection", "keep-alive, x-custom")], id="connection-option"),
    pytest.param([("Range", "bytes=0-\x80")], id="obs-text"),
    pytest.param([("Range", "bytes=0-1\t")], id="trailing-tab"),
    pytest.param([("Range", "bytes=0-1 ")], id="trailing-space"),
    pytest.param([("Range", "bytes=0-1,\t3-4")], id="inner-tab"),
]


@pytest.mark.parametrize("fields", FALLBACK_FIELDS)
async def test_fallback_answer_is_identical(pair: Pair, fields: list[tuple[str, str]]) -> None:
    etag = pair.spec.key
    filled = [(name, value.format(etag=etag)) for name, value in fields]
    await assert_fallback_and_identical(pair, head_of(pair.url, *filled))


async def test_conditional_get_gets_304_from_aiohttp(pair: Pair) -> None:
    head = head_of(pair.url, ("If-None-Match", etag_for(pair.spec.key)))
    answer = await assert_fallback_and_identical(pair, head)
    assert answer.status == 304


async def test_head_goes_to_aiohttp(pair: Pair) -> None:
    head = head_of(pair.url, method="HEAD")
    answer = await assert_fallback_and_identical(pair, head, method="HEAD")
    assert answer.header(b"Content-Length") == str(LENGTH).encode()


async def test_http_1_0_goes_to_aiohttp(pair: Pair) -> None:
    await assert_fallback_and_identical(pair, head_of(pair.url, version="HTTP/1.0"))


async def test_connection_close_goes_to_aiohttp_and_closes(pair: Pair) -> None:
    conn = await Connection.open(pair.fast.client)
    try:
        answer = await conn.ask(head_of(pair.url, ("Connection", "close")))
        assert answer.status == 200 and answer.body == BODY
        assert await conn.closed_by_server()
    finally:
        conn.close()
    assert pair.fast.fast == 0


async def test_unverified_url_goes_to_aiohttp_first(pair: Pair) -> None:
    other = sign(pair.keyring, pair.spec, ttl=7200)  # another target: not in the memo
    assert (await pair.fast.ask(head_of(other))).status == 200
    assert pair.fast.fast == 0
    assert (await pair.fast.ask(head_of(other))).status == 200
    assert pair.fast.fast == 1


async def test_a_memoized_url_that_expired_is_410(pair: Pair) -> None:
    expired = sign(pair.keyring, pair.spec, ttl=1, now=time.time() - 3600)
    for _ in range(2):  # the second is in the memo: expiry is still checked
        answer = await pair.fast.ask(head_of(expired))
        assert answer.status == 410, answer
    assert pair.fast.fast == 0
    assert await metric(pair.fast.client, "nearvoice_token_rejections_total", reason="expired") == 2


async def test_a_memoized_url_bound_to_another_address_is_403(pair: Pair) -> None:
    bound = sign(pair.keyring, pair.spec, ip="192.0.2.0/24")
    for _ in range(2):
        answer = await pair.fast.ask(head_of(bound))
        assert answer.status == 403, answer
    assert pair.fast.fast == 0


async def test_a_purged_object_is_not_served_from_memory(pair: Pair) -> None:
    assert await pair.fast.app[NODE].purge(pair.spec.key)
    answer = await pair.fast.ask(head_of(pair.url))
    assert pair.fast.fast == 0
    assert answer.status != 200


# -- connections --------------------------------------------------------------------------------


async def test_keep_alive_connection_stays_on_the_fast_path(pair: Pair) -> None:
    conn = await Connection.open(pair.fast.client)
    try:
        for i in range(20):
            start = i * 4096
            answer = await conn.ask(head_of(pair.url, ("Range", f"bytes={start}-{start + 99}")))
            assert answer.body == BODY[start : start + 100]
    finally:
        conn.close()
    assert pair.fast.fast == 20


async def test_head_split_across_segments_takes_the_fast_path(pair: Pair) -> None:
    head = head_of(pair.url, ("Range", "bytes=0-99"))
    expected = await pair.slow.ask(head)
    conn = await Connection.open(pair.fast.client)
    try:
        await conn.send(head[:20], head[20:-3], head[-3:])
        assert await read_answer(conn.reader) == expected
    finally:
        conn.close()
    assert pair.fast.fast == 1


async def test_pipelined_requests_are_answered_in_order_by_aiohttp(pair: Pair) -> None:
    first = head_of(pair.url, ("Range", "bytes=0-9"))
    second = head_of(pair.url, ("Range", "bytes=10-19"))
    conn = await Connection.open(pair.fast.client)
    try:
        await conn.send(first + second)
        assert (await read_answer(conn.reader)).body == BODY[0:10]
        assert (await read_answer(conn.reader)).body == BODY[10:20]
    finally:
        conn.close()
    assert pair.fast.fast == 0


async def test_request_after_a_fallback_takes_the_fast_path(pair: Pair) -> None:
    conn = await Connection.open(pair.fast.client)
    try:
        conditional = head_of(pair.url, ("If-None-Match", etag_for(pair.spec.key)))
        assert (await conn.ask(conditional)).status == 304
        assert (await conn.ask(head_of(pair.url, ("Range", "bytes=0-9")))).body == BODY[:10]
    finally:
        conn.close()
    assert pair.fast.fast == 1


async def test_request_after_a_body_is_left_to_aiohttp(pair: Pair) -> None:
    """After a request with a body the connection stays aiohttp's: what follows the head
    is not a new request."""
    conn = await Connection.open(pair.fast.client)
    try:
        body = b'{"keys": []}'
        post = head_of(
            "/admin/purge",
            ("Content-Type", "application/json"),
            ("Content-Length", "12"),
            method="POST",
        )
        await conn.send(post + body)
        assert (await read_answer(conn.reader)).status == 403  # no admin token configured
        assert (await conn.ask(head_of(pair.url, ("Range", "bytes=0-9")))).body == BODY[:10]
    finally:
        conn.close()
    assert pair.fast.fast == 0


async def test_bare_lf_request_is_not_held_back(pair: Pair) -> None:
    head = head_of(pair.url).replace(b"\r\n", b"\n")
    await assert_fallback_and_identical(pair, head)


async def still_serving_after_hang_up(pair: Pair, sent: bytes) -> None:
    """Sends `sent` and resets the connection at once; the edge then still gives the next
    client the fast answer. (Whether the reset came before the server read `sent` is the
    kernel's business, so the counter is only known to have grown.)"""
    conn = await Connection.open(pair.fast.client)
    await conn.send(sent)
    conn.writer.transport.abort()
    head = head_of(pair.url, ("Range", "bytes=0-9"))
    ours, theirs = await pair.both(head)
    assert ours == theirs
    assert pair.fast.fast >= 1


async def test_client_that_hangs_up_after_asking_leaves_the_server_serving(pair: Pair) -> None:
    await still_serving_after_hang_up(pair, head_of(pair.url))


async def test_client_that_hangs_up_mid_head_leaves_the_server_serving(pair: Pair) -> None:
    await still_serving_after_hang_up(pair, head_of(pair.url)[:30])


async def test_idle_connection_closes_after_the_keep_alive_timeout(
    aiohttp_client: AiohttpClient, tmp_path: Path, keyring: Keyring
) -> None:
    """Fast answers move the idle deadline like aiohttp's own: a connection busy for
    longer than the timeout stays open, and closes once it has been idle for it."""
    spec = make_spec()
    edge = await start_edge(
        aiohttp_client, tmp_path, keyring, spec, http=HttpSettings(), keepalive_timeout=1.0
    )
    url = sign(keyring, spec)
    await edge.ask(head_of(url))
    conn = await Connection.open(edge.client)
    try:
        for _ in range(10):  # two seconds in all
            assert (await conn.ask(head_of(url, ("Range", "bytes=0-9")))).body == BODY[:10]
            await asyncio.sleep(0.2)
        assert edge.fast == 10
        assert await conn.closed_by_server()
    finally:
        conn.close()


# -- accounting ---------------------------------------------------------------------------------


async def test_fast_answers_are_counted_as_the_ordinary_path_counts(pair: Pair) -> None:
    heads = [head_of(pair.url, ("Range", f"bytes={i * 1000}-{i * 1000 + 499}")) for i in range(7)]
    for edge in (pair.fast, pair.slow):
        for head in heads:
            await edge.ask(head)
    assert pair.fast.fast == 7
    samples = [
        ("nearvoice_requests_total", {"result": "hit"}),
        ("nearvoice_response_bytes_total", {"source": "cache"}),
        ("nearvoice_ttfb_seconds_count", {"result": "hit"}),
    ]
    for sample, labels in samples:
        fast = await metric(pair.fast.client, sample, **labels)
        slow = await metric(pair.slow.client, sample, **labels)
        assert fast == slow, sample
    assert await metric(pair.fast.client, "nearvoice_requests_total", result="hit") == 8


async def test_fast_answers_count_as_hot_key_hits(pair: Pair) -> None:
    for _ in range(5):
        await pair.fast.ask(head_of(pair.url))
    assert pair.fast.fast == 5
    nodes = [edge.app[NODE] for edge in (pair.fast, pair.slow)]
    for _ in range(5):
        await pair.slow.ask(head_of(pair.url))
    assert nodes[0].hotkeys.top(1) == nodes[1].hotkeys.top(1)
    assert nodes[0].hotkeys.top(1)[0].hits == 6


# -- what the fast path remembers --------------------------------------------------------------


def edge_server(edge: Edge) -> EdgeServer:
    server = edge.client.server.handler
    assert isinstance(server, EdgeServer)
    return server


async def test_only_answered_heads_are_remembered(pair: Pair) -> None:
    answered = head_of(pair.url, ("Range", "bytes=5-9"))
    assert (await pair.fast.ask(answered)).body == BODY[5:10]
    unverified = head_of(sign(pair.keyring, make_spec("Another line.")), ("Range", "bytes=5-9"))
    assert (await pair.fast.ask(unverified)).status == 503  # not held, no renderer: aiohttp's
    heads = edge_server(pair.fast).heads
    assert answered.removesuffix(b"\r\n\r\n") in heads
    assert unverified.removesuffix(b"\r\n\r\n") not in heads


async def test_many_ranges_of_one_object_stay_exact(pair: Pair) -> None:
    """More distinct ranges than an entry keeps ready: each answer is still the ordinary
    path's, on one keep-alive connection."""
    conn = await Connection.open(pair.fast.client)
    try:
        for i in range(3 * PREPARED_PER_ENTRY):
            start = i * 997
            head = head_of(pair.url, ("Range", f"bytes={start}-{start + 499}"))
            answer = await conn.ask(head)
            assert answer.status == 206 and answer.body == BODY[start : start + 500]
            assert (
                answer.header(b"Content-Range") == f"bytes {start}-{start + 499}/{LENGTH}".encode()
            )
        # and the first again, made ready anew
        assert (await conn.ask(head_of(pair.url, ("Range", "bytes=0-499")))).body == BODY[:500]
    finally:
        conn.close()
    assert pair.fast.fast == 3 * PREPARED_PER_ENTRY + 1


async def test_a_refilled_object_is_answered_with_its_new_entry(pair: Pair) -> None:
    """Ready answers belong to the hot entry: once the object is purged and stored again
    with other bytes, the fast path answers with the new bytes, never the old ones."""
    head = head_of(pair.url, ("Range", "bytes=0-99"))
    assert (await pair.fast.ask(head)).body == BODY[:100]
    app = pair.fast.app
    node = app[NODE]
    await node.purge(pair.spec.key)
    other = payload(LENGTH, seed=12)
    put_object(app, pair.spec, other, stored_at=STORED_AT)
    assert (await pair.fast.ask(head_of(pair.url))).body == other  # the ordinary path refills
    before = pair.fast.fast
    assert (await pair.fast.ask(head)).body == other[:100]
    assert pair.fast.fast == before + 1


def test_the_date_line_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    from nearvoice.edge.http import direct

    monkeypatch.setattr(direct, "rfc822_formatted_time", lambda: "Sat, 28 Nov 2026 10:00:00 GMT")
    assert direct.date_line() == b"Date: Sat, 28 Nov 2026 10:00:00 GMT\r\n\r\n"
    monkeypatch.setattr(direct, "rfc822_formatted_time", lambda: "Sat, 28 Nov 2026 10:00:01 GMT")
    assert direct.date_line() == b"Date: Sat, 28 Nov 2026 10:00:01 GMT\r\n\r\n"
