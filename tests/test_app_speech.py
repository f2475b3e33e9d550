"""GET/HEAD /v1/speech on a real aiohttp server on loopback.

Rejections: every bad URL gets the right status and a JSON `error` code, and nothing is
stored or rendered. Delivery: validators, Cache-Control, preconditions, Range, HEAD and
multipart framing, over both the in-memory body path and the file-descriptor path, with
sendfile on and off, and with the fast path (edge/http/fastpath.py) on and off.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from yarl import URL

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.hot import HotSettings
from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.config import HttpSettings, SynthSettings
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.node import Node
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import speech_path
from tests.support import (
    EdgeTestServer,
    fast_answers,
    forge,
    make_config,
    make_keyring,
    make_spec,
    metric,
    node_of,
    payload,
    put_object,
    sign,
    signed_fields,
    target,
    wait_ready,
)

Client = TestClient[Any, Any]
OBJECT_LENGTH = 100_003  # odd and prime-ish, so off-by-one errors show
SMALL_HOT_LIMIT = 1024  # below OBJECT_LENGTH: the object is held by descriptor


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring()


@pytest.fixture
def spec() -> Spec:
    return make_spec()


def _json_error(body: Any) -> str:
    assert isinstance(body, dict), body
    code = body.get("error")
    assert isinstance(code, str) and code, body
    return code


async def expect_error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    found = _json_error(body)
    if code is not None:
        assert found == code, body
    return dict(body)


# -- rejections ---------------------------------------------------------------------------

MakeApp = Callable[..., web.Application]


@pytest.fixture
def make_app(tmp_path: Any, keyring: Keyring) -> MakeApp:
    def build(**overrides: Any) -> web.Application:
        return create_app(make_config(tmp_path, **overrides), keyring, engines=[])

    return build


@pytest.fixture
async def app_client(
    make_app: MakeApp, aiohttp_client: AiohttpClient
) -> tuple[web.Application, Client]:
    app = make_app()
    return app, await aiohttp_client(app)


def assert_nothing_stored(app: web.Application, spec: Spec) -> None:
    node = node_of(app)
    assert node.store.count() == 0
    assert not node.store.contains(spec.key)
    assert len(node.hot) == 0


async def get_error(
    app_client: tuple[web.Application, Client], url: str | URL, status: int, code: str
) -> dict[str, Any]:
    _, client = app_client
    if isinstance(url, URL):
        async with client.session.get(url) as resp:
            return await expect_error(resp, status, code)
    async with client.get(url) as resp:
        return await expect_error(resp, status, code)


async def test_bad_signature_is_403(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    other = signed_fields(keyring, make_spec("Another line."))
    fields["sig"] = other["sig"]
    await get_error(app_client, target(speech_path(spec), fields), 403, "bad_signature")
    assert_nothing_stored(app_client[0], spec)


async def test_signature_from_another_secret_is_403(app_client: Any, spec: Spec) -> None:
    stranger = make_keyring("test1:a-completely-different-secret-value")
    url = sign(stranger, spec)
    await get_error(app_client, url, 403, "bad_signature")
    assert_nothing_stored(app_client[0], spec)


async def test_missing_signature_is_403(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    del fields["sig"]
    await get_error(app_client, target(speech_path(spec), fields), 403, "bad_signature")
    assert_nothing_stored(app_client[0], spec)


async def test_unknown_key_id_is_403(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    fields["kid"] = "nobody"
    await get_error(app_client, target(speech_path(spec), fields), 403, "unknown_kid")
    assert_nothing_stored(app_client[0], spec)


async def test_expired_url_is_410(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    url = sign(keyring, spec, ttl=60, now=time.time() - 3600)
    await get_error(app_client, url, 410, "expired")
    assert_nothing_stored(app_client[0], spec)


async def test_other_client_address_is_403(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    url = sign(keyring, spec, ip="10.0.0.0/8")
    await get_error(app_client, url, 403, "ip_mismatch")
    assert_nothing_stored(app_client[0], spec)


async def test_matching_client_address_is_served(
    app_client: Any, keyring: Keyring, spec: Spec
) -> None:
    app, client = app_client
    body = payload(4096)
    put_object(app, spec, body)
    async with client.get(sign(keyring, spec, ip="127.0.0.1/32")) as resp:
        assert resp.status == 200
        assert await resp.read() == body


async def test_key_not_hash_of_spec_is_403(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    other = make_spec("A different line entirely.")
    fields = signed_fields(keyring, other)
    url = forge(keyring, speech_path(spec), fields)  # spec's key, other's sealed spec
    await get_error(app_client, url, 403, "key_mismatch")
    assert_nothing_stored(app_client[0], spec)
    assert not node_of(app_client[0]).store.contains(other.key)


async def test_garbled_sealed_spec_is_403(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    fields["s"] = fields["s"][:-4] + ("AAAA" if not fields["s"].endswith("AAAA") else "BBBB")
    url = forge(keyring, speech_path(spec), fields)
    await get_error(app_client, url, 403, "bad_seal")
    assert_nothing_stored(app_client[0], spec)


async def test_extension_other_than_spec_format_is_400(
    app_client: Any, keyring: Keyring, spec: Spec
) -> None:
    path = f"/v1/speech/{spec.key}.mp3"  # the spec says wav
    url = forge(keyring, path, signed_fields(keyring, spec))
    await get_error(app_client, url, 400, "format_mismatch")
    assert_nothing_stored(app_client[0], spec)


async def test_unknown_query_parameter_is_400(
    app_client: Any, keyring: Keyring, spec: Spec
) -> None:
    fields = signed_fields(keyring, spec)
    url = target(speech_path(spec), [*fields.items(), ("debug", "1")])
    body = await get_error(app_client, url, 400, "unknown_parameter")
    assert "debug" in body["message"]
    assert_nothing_stored(app_client[0], spec)


async def test_repeated_query_parameter_is_400(
    app_client: Any, keyring: Keyring, spec: Spec
) -> None:
    fields = signed_fields(keyring, spec)
    url = target(speech_path(spec), [*fields.items(), ("p", "hot")])
    await get_error(app_client, url, 400, "repeated_parameter")
    assert_nothing_stored(app_client[0], spec)


async def test_repeated_signature_is_400(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    url = target(speech_path(spec), [("sig", "AAAA"), *fields.items()])
    await get_error(app_client, url, 400, "repeated_parameter")
    assert_nothing_stored(app_client[0], spec)


async def test_uppercase_key_is_400(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    url = target(f"/v1/speech/{spec.key.upper()}.wav", fields)
    await get_error(app_client, url, 400, "malformed_key")
    assert_nothing_stored(app_client[0], spec)


async def test_short_key_is_400(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    url = target(f"/v1/speech/{spec.key[:63]}.wav", fields)
    await get_error(app_client, url, 400, "malformed_key")
    assert_nothing_stored(app_client[0], spec)


async def test_unsupported_extension_is_400(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    fields = signed_fields(keyring, spec)
    url = target(f"/v1/speech/{spec.key}.ogg", fields)
    body = await get_error(app_client, url, 400, "unsupported_format")
    assert set(body["known"]) == {f.value for f in AudioFormat}
    assert_nothing_stored(app_client[0], spec)


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/speech/../../etc/passwd",
        "/v1/speech/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/speech/..%2F..%2Fetc%2Fpasswd",
        "/v1/speech/%2e%2e/%2e%2e/etc/passwd",
    ],
)
async def test_path_traversal_is_refused_with_json(app_client: Any, raw_path: str) -> None:
    app, client = app_client
    url = URL(f"http://{client.host}:{client.port}{raw_path}", encoded=True)
    assert url.raw_path == raw_path.split("?")[0]  # sent as written, not normalized
    async with client.session.get(url) as resp:
        assert resp.status != 200
        assert 400 <= resp.status < 500
        assert resp.content_type == "application/json"
        _json_error(await resp.json())
    assert node_of(app).store.count() == 0


async def test_text_over_the_limit_is_400(
    make_app: MakeApp, aiohttp_client: AiohttpClient, keyring: Keyring
) -> None:
    app = make_app(synth=SynthSettings(workers=1, max_text_chars=20))
    client = await aiohttp_client(app)
    spec = make_spec("This line is longer than twenty characters.")
    async with client.get(sign(keyring, spec)) as resp:
        await expect_error(resp, 400, "text_too_long")
    assert_nothing_stored(app, spec)


async def test_text_at_the_limit_is_accepted(
    make_app: MakeApp, aiohttp_client: AiohttpClient, keyring: Keyring
) -> None:
    app = make_app(synth=SynthSettings(workers=1, max_text_chars=20))
    client = await aiohttp_client(app)
    spec = make_spec("x" * 20)
    body = payload(512)
    put_object(app, spec, body)
    async with client.get(sign(keyring, spec)) as resp:
        assert resp.status == 200
        assert await resp.read() == body


async def test_unknown_voice_is_400_listing_known_voices(app_client: Any, keyring: Keyring) -> None:
    spec = make_spec(voice="nobody")
    body = await get_error(app_client, sign(keyring, spec), 400, "unknown_voice")
    assert "heart" in body["known"]
    assert_nothing_stored(app_client[0], spec)


@pytest.mark.parametrize("speed", [0.4, 2.5])
async def test_speed_outside_the_bounds_is_400_and_never_rendered(
    app_client: Any, keyring: Keyring, speed: float
) -> None:
    # Spec.create refuses such a speed, so build the dataclass directly, as a buggy or
    # hostile signer could, and seal it into a correctly signed URL.
    base = make_spec()
    spec = Spec(
        text=base.text, voice=base.voice, format=base.format, speed=speed, seed=0, model=base.model
    )
    body = await get_error(app_client, sign(keyring, spec), 400, "bad_speed")
    assert "0.5" in body["message"] and "2.0" in body["message"]
    assert_nothing_stored(app_client[0], spec)


async def test_post_is_405_with_allow(app_client: Any, keyring: Keyring, spec: Spec) -> None:
    app, client = app_client
    async with client.post(sign(keyring, spec)) as resp:
        await expect_error(resp, 405)
        allowed = {m.strip() for m in resp.headers.get("Allow", "").split(",")}
        assert {"GET", "HEAD"} <= allowed
        assert "POST" not in allowed
    assert_nothing_stored(app, spec)


async def test_miss_without_a_renderer_is_503_no_renderer(
    app_client: Any, keyring: Keyring, spec: Spec
) -> None:
    """A valid URL for an object this node neither holds nor can render: the node is
    unable to serve it right now (503), the URL itself is fine (not 4xx)."""
    await get_error(app_client, sign(keyring, spec), 503, "no_renderer")
    assert_nothing_stored(app_client[0], spec)


@pytest.mark.slow
async def test_rejected_urls_never_start_a_render(
    tmp_path: Any, aiohttp_client: AiohttpClient, keyring: Keyring, spec: Spec
) -> None:
    """With the real engine loaded, no rejected URL reaches it; a valid one does."""
    config = make_config(tmp_path, synth=SynthSettings(workers=1, max_text_chars=40))
    app = create_app(config, keyring)
    client = await aiohttp_client(app)
    await wait_ready(client)
    path = speech_path(spec)
    fields = signed_fields(keyring, spec)
    rejected = {
        "bad_signature": target(path, {**fields, "sig": "AAAA"}),
        "missing_sig": target(path, {k: v for k, v in fields.items() if k != "sig"}),
        "expired": sign(keyring, spec, ttl=60, now=time.time() - 3600),
        "ip_mismatch": sign(keyring, spec, ip="10.0.0.0/8"),
        "key_mismatch": forge(keyring, path, signed_fields(keyring, make_spec("Other."))),
        "unknown_parameter": target(path, [*fields.items(), ("x", "1")]),
        "repeated_parameter": target(path, [*fields.items(), ("kid", fields["kid"])]),
        "text_too_long": sign(keyring, make_spec("y" * 41)),
        "unknown_voice": sign(keyring, make_spec(voice="nobody")),
        "format_mismatch": forge(keyring, f"/v1/speech/{spec.key}.flac", fields),
    }
    for name, url in rejected.items():
        async with client.get(url) as resp:
            assert 400 <= resp.status < 500, name
            _json_error(await resp.json())
    assert await metric(client, "nearvoice_synth_total", engine="hibari") == 0
    assert node_of(app).store.count() == 0

    async with client.get(sign(keyring, spec)) as resp:  # the control: this one renders
        assert resp.status == 200
        await resp.read()
    assert await metric(client, "nearvoice_synth_total", engine="hibari") == 1


# -- delivery -----------------------------------------------------------------------------


@dataclass
class Served:
    app: web.Application
    client: Client
    keyring: Keyring
    spec: Spec
    meta: ObjectMeta
    body: bytes
    url: str
    path_kind: str

    @property
    def node(self) -> Node:
        return node_of(self.app)

    @property
    def length(self) -> int:
        return len(self.body)


@pytest.fixture(params=["memory", "descriptor"])
def body_path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[True, False], ids=["sendfile", "no-sendfile"])
def use_sendfile(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=[True, False], ids=["fast-path", "no-fast-path"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


MakeServed = Callable[..., Awaitable[Served]]


@pytest.fixture
def make_served(
    tmp_path: Any,
    aiohttp_client: AiohttpClient,
    keyring: Keyring,
    body_path: str,
    use_sendfile: bool,
    fast_path: bool,
) -> MakeServed:
    async def build(policy: Policy = Policy.HOT, fmt: AudioFormat = AudioFormat.WAV) -> Served:
        hot = HotSettings(max_object_bytes=SMALL_HOT_LIMIT) if body_path == "descriptor" else None
        config = make_config(
            tmp_path,
            http=HttpSettings(sendfile=use_sendfile, fast_path=fast_path),
            **({"hot": hot} if hot else {}),
        )
        app = create_app(config, keyring, engines=[])
        client = await aiohttp_client(EdgeTestServer(app))
        spec = make_spec(fmt=fmt)
        body = payload(OBJECT_LENGTH, seed=7)
        meta = put_object(app, spec, body, policy=policy)
        url = sign(keyring, spec, policy=policy)
        if fast_path:
            # The URL's first request is verified on the ordinary path; warm the memo and
            # the hot tier so the tests' own requests can take the fast path.
            async with client.get(url) as resp:
                assert resp.status == 200
                await resp.read()
        return Served(app, client, keyring, spec, meta, body, url, body_path)

    return build


@pytest.fixture
async def served(make_served: MakeServed) -> Served:
    return await make_served()


def etag_of(s: Served) -> str:
    return etag_for(s.spec.key)


async def test_body_path_is_the_one_under_test(served: Served) -> None:
    async with served.client.get(served.url) as resp:
        assert resp.status == 200
        await resp.read()
    entry = served.node.hot.get(served.spec.key, time.time())
    assert entry is not None
    if served.path_kind == "memory":
        assert entry.body is not None and entry.file is None
    else:
        assert entry.body is None and entry.file is not None


async def test_plain_hits_take_the_fast_path_when_it_is_on(served: Served, fast_path: bool) -> None:
    """Only objects held in memory are answered by the fast path."""
    for range_value in ("bytes=0-99", "bytes=-10"):
        async with served.client.get(served.url, headers={"Range": range_value}) as resp:
            assert resp.status == 206
            await resp.read()
    taken = fast_path and served.path_kind == "memory"
    assert fast_answers(served.client) == (2 if taken else 0)


async def test_full_get_sends_the_object(served: Served) -> None:
    async with served.client.get(served.url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(served.length)
        body = await resp.read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(served.body).hexdigest()


async def test_repeated_gets_send_identical_bytes(served: Served) -> None:
    bodies = []
    for _ in range(3):
        async with served.client.get(served.url) as resp:
            assert resp.status == 200
            bodies.append(await resp.read())
    assert bodies == [served.body] * 3


async def test_hit_headers(served: Served) -> None:
    async with served.client.get(served.url) as resp:
        await resp.read()
        h = resp.headers
    assert h["ETag"] == etag_of(served)
    assert not h["ETag"].startswith("W/")
    assert h["Accept-Ranges"] == "bytes"
    assert h["Content-Type"] == "audio/wav"
    assert h["Last-Modified"] == formatdate(served.meta.last_modified, usegmt=True)


async def test_hot_policy_cache_control(make_served: MakeServed) -> None:
    s = await make_served(Policy.HOT)
    async with s.client.get(s.url) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "public, max-age=86400, immutable"


async def test_personal_policy_cache_control(make_served: MakeServed) -> None:
    s = await make_served(Policy.PERSONAL)
    async with s.client.get(s.url) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "private, max-age=3600"


async def test_cache_control_follows_the_url_policy_not_the_stored_one(
    app_client: Any, keyring: Keyring, spec: Spec
) -> None:
    """docs/contracts.md#signed-urls: the policy the URL carries sets the downstream Cache-Control.
    A `personal` URL must never be answered `public` because the same spec was stored
    earlier through a `hot` URL. (Not parametrized over the body paths: the headers do
    not depend on them.)"""
    app, client = app_client
    put_object(app, spec, payload(4096), policy=Policy.HOT)
    async with client.get(sign(keyring, spec, policy=Policy.PERSONAL)) as resp:
        assert resp.status == 200
        await resp.read()
        assert resp.headers["Cache-Control"] == "private, max-age=3600"


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        (AudioFormat.MP3, "audio/mpeg"),
        (AudioFormat.OPUS, "audio/ogg;codecs=opus"),
        (AudioFormat.FLAC, "audio/flac"),
        (AudioFormat.PCM, "audio/pcm;rate=24000;channels=1;encoding=s16le"),
    ],
)
async def test_content_type_per_format(
    make_served: MakeServed, fmt: AudioFormat, content_type: str
) -> None:
    s = await make_served(fmt=fmt)
    async with s.client.get(s.url) as resp:
        assert resp.status == 200
        await resp.read()
        assert resp.headers["Content-Type"] == content_type


async def test_if_none_match_is_304_without_body(served: Served) -> None:
    headers = {"If-None-Match": etag_of(served)}
    async with served.client.get(served.url, headers=headers) as resp:
        assert resp.status == 304
        assert resp.headers["ETag"] == etag_of(served)
        assert resp.headers["Cache-Control"] == "public, max-age=86400, immutable"
        assert await resp.read() == b""


async def test_if_none_match_other_tag_sends_200(served: Served) -> None:
    headers = {"If-None-Match": '"not-this-one"'}
    async with served.client.get(served.url, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == served.body


async def test_if_match_mismatch_is_412_json(served: Served) -> None:
    headers = {"If-Match": '"something-else"'}
    async with served.client.get(served.url, headers=headers) as resp:
        await expect_error(resp, 412, "precondition_failed")


async def test_if_match_same_tag_sends_200(served: Served) -> None:
    headers = {"If-Match": etag_of(served)}
    async with served.client.get(served.url, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == served.body


async def test_range_is_206(served: Served) -> None:
    async with served.client.get(served.url, headers={"Range": "bytes=100-1123"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-1123/{served.length}"
        assert resp.headers["Content-Length"] == "1024"
        assert resp.headers["Content-Type"] == "audio/wav"
        assert await resp.read() == served.body[100:1124]


async def test_suffix_range_is_the_tail(served: Served) -> None:
    async with served.client.get(served.url, headers={"Range": "bytes=-500"}) as resp:
        assert resp.status == 206
        n = served.length
        assert resp.headers["Content-Range"] == f"bytes {n - 500}-{n - 1}/{n}"
        assert await resp.read() == served.body[-500:]


async def test_if_range_with_the_etag_honours_range(served: Served) -> None:
    headers = {"Range": "bytes=0-99", "If-Range": etag_of(served)}
    async with served.client.get(served.url, headers=headers) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 0-99/{served.length}"
        assert await resp.read() == served.body[:100]


async def test_if_range_with_another_etag_sends_the_whole_object(served: Served) -> None:
    headers = {"Range": "bytes=0-99", "If-Range": '"stale-tag"'}
    async with served.client.get(served.url, headers=headers) as resp:
        assert resp.status == 200
        assert "Content-Range" not in resp.headers
        assert await resp.read() == served.body


async def test_if_range_with_the_last_modified_date_honours_range(served: Served) -> None:
    headers = {
        "Range": "bytes=10-19",
        "If-Range": formatdate(served.meta.last_modified, usegmt=True),
    }
    async with served.client.get(served.url, headers=headers) as resp:
        assert resp.status == 206
        assert await resp.read() == served.body[10:20]


async def test_if_range_with_an_earlier_date_sends_the_whole_object(served: Served) -> None:
    headers = {
        "Range": "bytes=10-19",
        "If-Range": formatdate(served.meta.last_modified - 3600, usegmt=True),
    }
    async with served.client.get(served.url, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == served.body


async def test_unsatisfiable_range_is_416_with_content_range(served: Served) -> None:
    headers = {"Range": f"bytes={served.length}-"}
    async with served.client.get(served.url, headers=headers) as resp:
        body = await expect_error(resp, 416, "range_not_satisfiable")
        assert resp.headers["Content-Range"] == f"bytes */{served.length}"
    assert body["error"] == "range_not_satisfiable"


async def test_head_has_length_and_no_body(served: Served) -> None:
    async with served.client.head(served.url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(served.length)
        assert resp.headers["ETag"] == etag_of(served)
        assert await resp.read() == b""
    async with served.client.get(served.url) as resp:  # the connection is still usable
        assert await resp.read() == served.body


async def test_head_ignores_range(served: Served) -> None:
    async with served.client.head(served.url, headers={"Range": "bytes=0-9"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(served.length)
        assert await resp.read() == b""


async def test_multipart_ranges_use_crlf_framing(served: Served) -> None:
    n = served.length
    ranges = [(0, 9), (5000, 5099), (n - 10, n - 1)]
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges)
    async with served.client.get(served.url, headers={"Range": header}) as resp:
        assert resp.status == 206
        content_type = resp.headers["Content-Type"]
        body = await resp.read()
        assert resp.headers["Content-Length"] == str(len(body))
    assert content_type.startswith("multipart/byteranges; boundary=")
    boundary = content_type.split("boundary=", 1)[1].encode()

    expected = bytearray()
    for start, end in ranges:
        expected += b"\r\n--" + boundary + b"\r\n"
        expected += b"Content-Type: audio/wav\r\n"
        expected += f"Content-Range: bytes {start}-{end}/{n}\r\n\r\n".encode()
        expected += served.body[start : end + 1]
    expected += b"\r\n--" + boundary + b"--\r\n"
    assert body == bytes(expected)
