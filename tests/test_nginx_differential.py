"""Differential test of Range handling against a real nginx serving the same bytes.

Where RFC 9110 leaves a choice (invalid syntax, too many ranges, overlapping ranges,
unknown units, ...), the edge must answer exactly like nginx serving a static file
(`edge/http/ranges.py`). Every Range header below goes verbatim to both servers, and the
answers are compared:

* status and Content-Range always (a 416's body is nginx's HTML against our JSON, so
  nothing more is compared for it);
* 200 and single-part 206: Content-Type, Content-Length and the body, byte for byte;
* multipart/byteranges: the list of parts (Content-Type, Content-Range, data) parsed with
  each answer's own boundary, and the whole body with the boundary blanked out (the
  framing is meant to match nginx's byte for byte).

The edge runs over every delivery path: the body held in memory by the hot tier, or held
as a file descriptor and sent with sendfile(2) or with pread-and-write; a 3 MiB object
(above the hot tier's in-memory limit) for a handful of headers; and a 0-byte object. The
`*-fast-path` variants run with edge.http.fastpath on and warmed, and check that each
answer came from the path expected (the fast path for a GET with one plain Range field, or
none, about an object in memory that is answered 200 or single-part 206; aiohttp
otherwise).

`test_head_of_empty_object_has_the_headers_of_get` guards a fixed bug: HEAD of a 0-byte
object once lacked the `Content-Length: 0` that nginx (and our GET) send.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import hdrs
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.hot import HotSettings
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.config import HttpSettings, NodeConfig
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.node import Node
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import sign_query, speech_path
from tests.support import EdgeTestServer, fast_answers

pytestmark = pytest.mark.nginx

CONTENT_TYPE = "audio/wav"
SMALL_LENGTH = 10007  # prime, so off-by-one errors cannot hide in round numbers
BIG_LENGTH = 3 * 1024**2 + 11  # above HotSettings().max_object_bytes: held by descriptor
SMALL_BODY = random.Random(9110).randbytes(SMALL_LENGTH)
BIG_BODY = random.Random(7233).randbytes(BIG_LENGTH)
BODIES = {"small": SMALL_BODY, "big": BIG_BODY, "empty": b""}
TEN_YEARS = 10 * 365 * 86400
MAX_RANGES = HttpSettings().max_ranges


# -- the Range headers ------------------------------------------------------------------------


def _ranges(count: int, step: int = 100, width: int = 10) -> str:
    """`count` disjoint, ascending ranges: 0-9,100-109,..."""
    return ",".join(f"{i * step}-{i * step + width - 1}" for i in range(count))


L = SMALL_LENGTH
MAX_OFF_T = (1 << 63) - 1

# (id, Range header sent verbatim). Ids name what the case probes.
SMALL_CASES: list[tuple[str, str]] = [
    # -- one satisfiable range
    ("first-100", "bytes=0-99"),
    ("middle", "bytes=1000-1999"),
    ("zero-zero", "bytes=0-0"),
    ("open-ended", "bytes=500-"),
    ("open-from-zero", "bytes=0-"),
    ("suffix-100", "bytes=-100"),
    ("suffix-1", "bytes=-1"),
    ("suffix-exact-length", f"bytes=-{L}"),
    ("suffix-longer-than-file", "bytes=-20000"),
    ("exact-last-byte", f"bytes={L - 1}-{L - 1}"),
    ("exact-last-byte-open", f"bytes={L - 1}-"),
    ("whole-exact", f"bytes=0-{L - 1}"),
    ("last-pos-one-past-end", f"bytes=0-{L}"),
    ("last-pos-past-end", "bytes=9000-20000"),
    ("leading-zeros", "bytes=000000000000000000000000001-002"),
    ("max-off-t-last-pos", f"bytes=0-{MAX_OFF_T}"),
    ("max-off-t-suffix", f"bytes=-{MAX_OFF_T}"),
    # -- nothing satisfiable
    ("suffix-zero", "bytes=-0"),
    ("first-pos-at-end", f"bytes={L}-"),
    ("first-pos-at-end-closed", f"bytes={L}-{L + 3}"),
    ("first-pos-past-end", "bytes=20000-30000"),
    ("max-off-t-first-pos", f"bytes={MAX_OFF_T}-"),
    ("reversed", "bytes=5-2"),
    ("reversed-and-past-end", "bytes=5-2,20000-"),
    ("past-end-and-suffix-zero", "bytes=20000-,-0"),
    # -- lists that mix satisfiable and unsatisfiable ranges
    ("reversed-then-valid", "bytes=5-2,10-19"),
    ("valid-then-past-end", "bytes=0-9,20000-"),
    ("valid-then-suffix-zero", "bytes=0-0,-0"),
    ("valid-then-garbage", "bytes=0-1,abc"),
    # -- several ranges
    ("two-ranges", "bytes=0-9,100-199"),
    ("three-unsorted-with-suffix", "bytes=500-599,0-9,-10"),
    ("adjacent", "bytes=0-99,100-199"),
    ("adjacent-covering-whole", f"bytes=0-{L // 2 - 1},{L // 2}-"),
    ("overlap-total-below-length", "bytes=0-99,50-149"),
    ("overlap-total-length-plus-1", f"bytes=0-{L // 2},{L // 2}-"),
    ("overlap-total-far-above-length", "bytes=0-9000,1000-"),
    ("duplicated", "bytes=0-99,0-99"),
    ("duplicated-suffix", "bytes=-100,-100"),
    ("suffix-longer-plus-range", "bytes=-20000,0-0"),
    ("open-ended-space-then-more", "bytes=0- ,3-4"),
    # -- the max_ranges cap (16)
    ("exactly-16-ranges", f"bytes={_ranges(MAX_RANGES)}"),
    ("17-ranges", f"bytes={_ranges(MAX_RANGES + 1)}"),
    ("40-ranges", f"bytes={_ranges(40, step=200)}"),
    ("16-ranges-plus-past-end", f"bytes={_ranges(MAX_RANGES)},20000-"),
    ("16-ranges-then-garbage", f"bytes={_ranges(MAX_RANGES)},x"),
    ("17-ranges-then-garbage", f"bytes={_ranges(MAX_RANGES + 1)},x"),
    # -- whitespace
    ("space-after-equals", "bytes= 0-1"),
    ("spaces-around-dash", "bytes=0 - 1"),
    ("space-before-last-pos", "bytes=0- 5"),
    ("space-inside-suffix", "bytes=- 5"),
    ("spaces-around-comma", "bytes=0-1 , 3-4"),
    ("trailing-space", "bytes=0-1 "),
    ("tab-after-comma", "bytes=0-1,\t3-4"),
    ("space-before-equals", "bytes =0-1"),
    # -- malformed
    ("empty-value", ""),
    ("unit-only", "bytes="),
    ("unit-and-space", "bytes= "),
    ("letters", "bytes=a-b"),
    ("no-dash", "bytes=1"),
    ("double-dash-suffix", "bytes=--1"),
    ("dash-only", "bytes=-"),
    ("dash-dash-after-first", "bytes=0--1"),
    ("suffix-then-dash", "bytes=-5-"),
    ("trailing-comma", "bytes=0-1,"),
    ("leading-comma", "bytes=,0-1"),
    ("double-comma", "bytes=0-1,,3-4"),
    ("three-numbers", "bytes=0-1-2"),
    ("hex-number", "bytes=0x10-20"),
    ("decimal-number", "bytes=1.5-2"),
    ("plus-sign", "bytes=+1-2"),
    ("parameter", "bytes=0-1;q=1"),
    ("huge-first-pos", "bytes=99999999999999999999-"),
    ("huge-last-pos", "bytes=0-99999999999999999999"),
    ("huge-suffix", "bytes=-99999999999999999999"),
    ("max-off-t-plus-1-last-pos", f"bytes=0-{MAX_OFF_T + 1}"),
    ("max-off-t-plus-1-suffix", f"bytes=-{MAX_OFF_T + 1}"),
    # -- other units and spellings
    ("items-unit", "items=0-1"),
    ("capitalized-unit", "Bytes=0-1"),
    ("uppercase-unit", "BYTES=0-1"),
    ("no-equals", "bytes 0-1"),
    ("unit-with-suffix", "bytesx=0-1"),
    ("word", "none"),
    ("non-ascii-digit", "bytes=0-\u0661"),
]

B = BIG_LENGTH
MIB = 1024**2
BIG_CASES: list[tuple[str, str]] = [
    ("big-first-100", "bytes=0-99"),
    ("big-middle-mib", f"bytes={MIB}-{2 * MIB - 1}"),
    ("big-open-ended", f"bytes={B - 300_000}-"),
    ("big-suffix", "bytes=-100"),
    ("big-whole-open", "bytes=0-"),
    ("big-three-parts", f"bytes=0-9,{MIB}-{MIB + 99999},-10"),
    ("big-past-end", f"bytes={B}-"),
    ("big-overlap-above-length", "bytes=0-1,1-"),
]

# A 0-byte object: nothing to range over, so nginx ignores a range starting at 0 (200) and
# refuses one starting later (416): the `start == 0` branch of `parse_range`.
EMPTY_CASES: list[tuple[str, str]] = [
    ("empty-open-from-zero", "bytes=0-"),
    ("empty-zero-zero", "bytes=0-0"),
    ("empty-suffix", "bytes=-5"),
    ("empty-suffix-zero", "bytes=-0"),
    ("empty-first-pos-1", "bytes=1-"),
    ("empty-two-ranges", "bytes=0-0,1-"),
    ("empty-malformed", "bytes=x"),
]


# -- the edge under test ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    """One way the edge holds and sends the object."""

    name: str
    size: str  # a key of BODIES
    sendfile: bool
    in_memory: bool  # the hot tier holds the bytes; otherwise an open descriptor
    fast_path: bool = False  # edge.http.fastpath on, its memo and hot tier warmed

    def __str__(self) -> str:
        return self.name


FAST_MEMORY = Variant("memory-fast-path", "small", sendfile=True, in_memory=True, fast_path=True)
SMALL_VARIANTS = [
    Variant("memory-sendfile-on", "small", sendfile=True, in_memory=True),
    Variant("memory-sendfile-off", "small", sendfile=False, in_memory=True),
    Variant("fd-sendfile-on", "small", sendfile=True, in_memory=False),
    Variant("fd-sendfile-off", "small", sendfile=False, in_memory=False),
    FAST_MEMORY,
    Variant("fd-fast-path", "small", sendfile=True, in_memory=False, fast_path=True),
]
BIG_VARIANTS = [
    Variant("big-fd-sendfile-on", "big", sendfile=True, in_memory=False),
    Variant("big-fd-sendfile-off", "big", sendfile=False, in_memory=False),
    Variant("big-fd-fast-path", "big", sendfile=True, in_memory=False, fast_path=True),
]
EMPTY_VARIANTS = [
    Variant("empty-memory", "empty", sendfile=True, in_memory=True),
    Variant("empty-memory-fast-path", "empty", sendfile=True, in_memory=True, fast_path=True),
]
ALL_VARIANTS = SMALL_VARIANTS + BIG_VARIANTS + EMPTY_VARIANTS


@dataclass(slots=True)
class Edge:
    client: TestClient[Any, Any]
    path: str
    node: Node
    key: str
    variant: Variant

    def assert_delivery_path(self) -> None:
        """The object was served the way the variant means to test."""
        entry = self.node.hot.get(self.key, time.time())
        assert entry is not None, "the object was not served from the cache"
        if self.variant.in_memory:
            assert entry.body is not None and entry.file is None
        else:
            assert entry.body is None and entry.file is not None


@pytest.fixture
async def edge(aiohttp_client: AiohttpClient, tmp_path: Path, variant: Variant) -> Edge:
    """An edge node with the variant's body already in its disk store, behind aiohttp's
    test server, and a signed path for it."""
    body = BODIES[variant.size]
    hot = HotSettings() if variant.in_memory else HotSettings(max_object_bytes=0)
    assert (len(body) <= hot.max_object_bytes) == variant.in_memory
    http = HttpSettings(sendfile=variant.sendfile, fast_path=variant.fast_path)
    config = NodeConfig(data_dir=tmp_path / "edge", http=http, hot=hot)
    keyring = Keyring.parse("t1:" + "s" * 32)
    app = create_app(config, keyring, engines=[])
    spec = Spec.create(
        text=f"nginx differential {variant.size}",
        voice="heart",
        format=AudioFormat.WAV,
        model="test@0",
    )
    meta = ObjectMeta(
        key=spec.key,
        content_type=CONTENT_TYPE,
        length=len(body),
        etag=etag_for(spec.key),
        sha256=hashlib.sha256(body).hexdigest(),
        policy=Policy.HOT,
        stored_at=time.time(),
        ttl=TEN_YEARS,
    )
    node = app[NODE]
    node.store.put(meta, body)
    client = await aiohttp_client(EdgeTestServer(app))
    query = sign_query(keyring, spec, policy=Policy.HOT, ttl=3600)
    path = f"{speech_path(spec)}?{urlencode(query)}"
    if variant.fast_path:
        # A URL's first request is verified on the ordinary path: after this one, the
        # differential requests can take the fast path.
        async with client.get(path) as response:
            assert response.status == 200
            await response.read()
    return Edge(client, path, node, spec.key, variant)


@pytest.fixture(scope="module")
def nginx_urls(nginx_server: Any) -> dict[str, str]:  # conftest.NginxServer
    """nginx's URL for each body, written as static files."""
    assert nginx_server.max_ranges == MAX_RANGES
    return {
        size: nginx_server.put(f"differential-{size}.wav", body) for size, body in BODIES.items()
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- fetching and comparing -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lowercase names; the first value of each
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _answer(response: aiohttp.ClientResponse, body: bytes) -> Answer:
    headers: dict[str, str] = {}
    for name, value in response.headers.items():
        headers.setdefault(name.lower(), value)
    return Answer(response.status, headers, body)


RangeFields = str | tuple[str, ...] | None
"""One Range header, several Range field lines, or none."""


def _request_headers(range_fields: RangeFields) -> CIMultiDict[str]:
    if range_fields is None:
        return CIMultiDict()
    values = (range_fields,) if isinstance(range_fields, str) else range_fields
    return CIMultiDict((hdrs.RANGE, value) for value in values)


async def fetch_nginx(
    http: aiohttp.ClientSession, url: str, range_fields: RangeFields, method: str = "GET"
) -> Answer:
    headers = _request_headers(range_fields)
    async with http.request(method, url, headers=headers) as response:
        return _answer(response, await response.read())


async def fetch_edge(edge: Edge, range_fields: RangeFields, method: str = "GET") -> Answer:
    headers = _request_headers(range_fields)
    before = fast_answers(edge.client)
    async with edge.client.request(method, edge.path, headers=headers) as response:
        answer = _answer(response, await response.read())
    if answer.status not in (200, 206, 416):
        pytest.fail(f"edge refused the request: {answer.status} {answer.body[:300]!r}")
    edge.assert_delivery_path()
    # The fast path answers a GET with at most one Range field (no tab, no trailing
    # whitespace) about an object in memory, when the answer is 200 or a single-part 206;
    # everything else is aiohttp's.
    plain_field = range_fields is None or (
        isinstance(range_fields, str)
        and "\t" not in range_fields
        and range_fields == range_fields.rstrip(" ")
    )
    fast = (
        edge.variant.fast_path
        and edge.variant.in_memory
        and method == "GET"
        and plain_field
        and answer.status in (200, 206)
        and not (answer.header(hdrs.CONTENT_TYPE) or "").startswith("multipart/")
    )
    assert fast_answers(edge.client) == before + fast, "not answered on the expected path"
    return answer


def _digest(data: bytes) -> str:
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def _boundary(content_type: str) -> str:
    mime, _, params = content_type.partition(";")
    assert mime.strip().lower() == "multipart/byteranges", content_type
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"')
    raise AssertionError(f"no boundary in {content_type!r}")


Part = tuple[str | None, str | None, bytes]


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart/byteranges body (RFC 2046 section 5.1.1, RFC 9110 14.6) as
    (Content-Type, Content-Range, data)."""
    boundary = _boundary(content_type).encode("latin-1")
    delimiter = b"\r\n--" + boundary
    text = body if body.startswith(b"\r\n") else b"\r\n" + body
    _preamble, *chunks, closing = text.split(delimiter)
    assert closing.startswith(b"--"), f"no close delimiter: {closing[:40]!r}"
    parts: list[Part] = []
    for chunk in chunks:
        assert chunk.startswith(b"\r\n"), f"delimiter line does not end in CRLF: {chunk[:40]!r}"
        head, sep, data = chunk[2:].partition(b"\r\n\r\n")
        assert sep, f"part headers never end: {chunk[:200]!r}"
        fields: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        parts.append((fields.get("content-type"), fields.get("content-range"), data))
    return parts


def _slice_of(content_range: str, body: bytes) -> bytes:
    """The bytes of `body` that `bytes first-last/length` names."""
    unit, _, spec = content_range.partition(" ")
    assert unit == "bytes", content_range
    span, _, length = spec.partition("/")
    assert int(length) == len(body), content_range
    first, _, last = span.partition("-")
    return body[int(first) : int(last) + 1]


def view(answer: Answer) -> dict[str, object]:
    """What must be equal between nginx's answer and ours, in a form that diffs readably."""
    out: dict[str, object] = {
        "status": answer.status,
        "content_range": answer.header(hdrs.CONTENT_RANGE),
    }
    if answer.status == 416:
        return out  # nginx's body is HTML, ours JSON
    content_type = answer.header(hdrs.CONTENT_TYPE) or ""
    length = answer.header(hdrs.CONTENT_LENGTH)
    out["content_length_is_body_length"] = length is not None and int(length) == len(answer.body)
    if content_type.lower().startswith("multipart/"):
        boundary = _boundary(content_type)
        out["content_type"] = "multipart/byteranges; boundary=<boundary>"
        out["parts"] = [
            (ctype, crange, _digest(data))
            for ctype, crange, data in parse_multipart(answer.body, content_type)
        ]
        blanked = answer.body.replace(boundary.encode("latin-1"), b"<boundary>")
        out["multipart_layout"] = _digest(blanked)
    else:
        out["content_type"] = content_type
        out["content_length"] = length
        out["body"] = _digest(answer.body)
    if answer.status == 200:
        out["accept_ranges"] = answer.header(hdrs.ACCEPT_RANGES)
    return out


def check_reference(answer: Answer, body: bytes) -> None:
    """nginx's own answer is what it should be, so the harness compares real bytes."""
    if answer.status == 200:
        assert answer.body == body
    elif answer.status == 206:
        content_type = answer.header(hdrs.CONTENT_TYPE) or ""
        if content_type.startswith("multipart/"):
            parts = parse_multipart(answer.body, content_type)
            assert len(parts) > 1
            for _ctype, crange, data in parts:
                assert crange is not None
                assert data == _slice_of(crange, body)
        else:
            crange = answer.header(hdrs.CONTENT_RANGE)
            assert crange is not None
            assert answer.body == _slice_of(crange, body)


async def compare(
    edge: Edge, http: aiohttp.ClientSession, nginx_url: str, range_fields: RangeFields
) -> None:
    body = BODIES[edge.variant.size]
    theirs = await fetch_nginx(http, nginx_url, range_fields)
    check_reference(theirs, body)
    ours = await fetch_edge(edge, range_fields)
    expected, actual = view(theirs), view(ours)
    assert actual == expected, (
        f"Range: {range_fields!r}: edge answers differently from nginx"
        f"{_first_difference(ours, theirs)}"
    )


def _first_difference(ours: Answer, theirs: Answer) -> str:
    single = all(
        a.status != 416 and not (a.header(hdrs.CONTENT_TYPE) or "").startswith("multipart/")
        for a in (ours, theirs)
    )
    if not single or ours.body == theirs.body:
        return ""
    at = next(
        (i for i, (a, b) in enumerate(zip(ours.body, theirs.body, strict=False)) if a != b),
        min(len(ours.body), len(theirs.body)),
    )
    return f" (bodies first differ at byte {at})"


# -- the tests --------------------------------------------------------------------------------


def _params(cases: list[tuple[str, str]]) -> Any:
    return [pytest.param(header, id=case_id) for case_id, header in cases]


def test_nginx_is_installed(nginx_check_installed: Callable[[], str]) -> None:
    """Fails (never skips) with how to install nginx when it is missing; the fixture
    `nginx_server` then errors with the same message in every differential test."""
    nginx_check_installed()


def test_case_ids_are_unique_and_enough() -> None:
    cases = SMALL_CASES + BIG_CASES + EMPTY_CASES
    assert len(SMALL_CASES) >= 40
    assert len({case_id for case_id, _ in cases}) == len(cases)


@pytest.mark.parametrize("variant", SMALL_VARIANTS, ids=str)
@pytest.mark.parametrize("range_header", _params(SMALL_CASES))
async def test_range_matches_nginx(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str], range_header: str
) -> None:
    await compare(edge, http, nginx_urls["small"], range_header)


@pytest.mark.parametrize("variant", BIG_VARIANTS, ids=str)
@pytest.mark.parametrize("range_header", _params(BIG_CASES))
async def test_big_object_range_matches_nginx(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str], range_header: str
) -> None:
    await compare(edge, http, nginx_urls["big"], range_header)


@pytest.mark.parametrize("variant", EMPTY_VARIANTS, ids=str)
@pytest.mark.parametrize("range_header", _params(EMPTY_CASES))
async def test_empty_object_range_matches_nginx(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str], range_header: str
) -> None:
    await compare(edge, http, nginx_urls["empty"], range_header)


@pytest.mark.parametrize("variant", [SMALL_VARIANTS[0], FAST_MEMORY], ids=str)
async def test_repeated_range_field_matches_nginx(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str]
) -> None:
    """Two Range field lines: both servers act on the first."""
    await compare(edge, http, nginx_urls["small"], ("bytes=0-1", "bytes=3-4,6-7"))


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=str)
async def test_get_without_range_matches_nginx(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str], variant: Variant
) -> None:
    body = BODIES[variant.size]
    theirs = await fetch_nginx(http, nginx_urls[variant.size], None)
    ours = await fetch_edge(edge, None)
    for answer in (theirs, ours):
        assert answer.status == 200
        assert answer.body == body
        assert answer.header(hdrs.CONTENT_LENGTH) == str(len(body))
        assert answer.header(hdrs.CONTENT_RANGE) is None
    assert view(ours) == view(theirs)


HEAD_HEADERS = (
    hdrs.CONTENT_LENGTH,
    hdrs.CONTENT_TYPE,
    hdrs.ACCEPT_RANGES,
    hdrs.ETAG,
    hdrs.LAST_MODIFIED,
)


async def check_head_matches_get(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str], variant: Variant
) -> None:
    url = nginx_urls[variant.size]
    answers = {
        "nginx": (
            await fetch_nginx(http, url, None, "GET"),
            await fetch_nginx(http, url, None, "HEAD"),
        ),
        "edge": (await fetch_edge(edge, None, "GET"), await fetch_edge(edge, None, "HEAD")),
    }
    for server, (get, head) in answers.items():
        assert head.status == get.status == 200, server
        assert head.body == b"", server
        for name in HEAD_HEADERS:
            assert head.header(name) is not None, f"{server}: HEAD lacks {name}"
            assert head.header(name) == get.header(name), f"{server}: {name}"
        assert head.header(hdrs.CONTENT_LENGTH) == str(len(BODIES[variant.size])), server
    nginx_head, edge_head = answers["nginx"][1], answers["edge"][1]
    for name in (hdrs.CONTENT_LENGTH, hdrs.CONTENT_TYPE, hdrs.ACCEPT_RANGES):
        assert edge_head.header(name) == nginx_head.header(name), name


@pytest.mark.parametrize("variant", SMALL_VARIANTS + BIG_VARIANTS, ids=str)
async def test_head_has_the_headers_of_get(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str], variant: Variant
) -> None:
    await check_head_matches_get(edge, http, nginx_urls, variant)


@pytest.mark.parametrize("variant", EMPTY_VARIANTS, ids=str)
async def test_head_of_empty_object_has_the_headers_of_get(
    edge: Edge, http: aiohttp.ClientSession, nginx_urls: dict[str, str], variant: Variant
) -> None:
    """HEAD of a 0-byte object carries `Content-Length: 0`, like nginx's and like our GET
    (aiohttp adds it on HEAD only for non-empty bodies, so deliver.py sets it itself)."""
    await check_head_matches_get(edge, http, nginx_urls, variant)
