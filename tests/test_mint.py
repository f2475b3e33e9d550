"""The origin's URL-minting API (`POST /v1/speech`, origin.mint) on a real loopback server.

The origin app has no engines: minting never renders. Every minted URL is checked the way
an edge checks it, with `edge.token.verify`, and its key against the spec's own key.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.config import OriginSettings, SynthSettings
from nearvoice.edge.errors import Forbidden
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import Grant, verify
from nearvoice.edge.voices import resolve
from nearvoice.origin.app import create_origin_app
from nearvoice.origin.mint import MINT_TOKEN_ENV
from tests.support import make_config, make_keyring

Client = TestClient[Any, Any]
KEYRING = make_keyring()
TOKEN = "mint-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PUBLIC_BASE = "https://cdn.example.test/audio"
MAX_TTL = 86400
MAX_TEXT = 200
TEXT = "A line the backend asks the origin to mint."


@pytest.fixture
def mint_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(MINT_TOKEN_ENV, TOKEN)
    return TOKEN


@pytest.fixture
async def origin(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client:
    config = make_config(
        tmp_path,
        origin=OriginSettings(public_base=PUBLIC_BASE, max_ttl=MAX_TTL),
        synth=SynthSettings(workers=1, max_text_chars=MAX_TEXT),
    )
    app = create_origin_app(config, KEYRING, engines=[], persistent=None)
    return await aiohttp_client(app)


async def post(client: Client, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    kwargs.setdefault("headers", AUTH)
    if body is not None:
        kwargs["json"] = body
    async with client.post("/v1/speech", **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def mint_ok(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = await post(client, body)
    assert status == 201, answer
    assert set(answer) == {"url", "key", "expires_at"}
    return dict(answer)


def verified(url: str, *, client_ip: str | None = None) -> Grant:
    """The grant an edge would derive from `url` (verify raises if it would refuse it)."""
    parts = urlsplit(url)
    path = parts.path[len(urlsplit(PUBLIC_BASE).path) :]
    name = path.rsplit("/", 1)[1]
    key, _, _ = name.partition(".")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return verify(KEYRING, path, key, query, client_ip=client_ip, now=time.time(), skew=0)


def spec_of(
    text: str = TEXT,
    voice: str = "heart",
    fmt: AudioFormat = AudioFormat.WAV,
    speed: float = 1.0,
    seed: int = 0,
) -> Spec:
    return Spec.create(
        text=text,
        voice=voice,
        format=fmt,
        model=resolve(voice).model_id,
        speed=speed,
        seed=seed,
    )


# -- minting ------------------------------------------------------------------------------


async def test_mint_answers_201_with_url_key_and_expiry(origin: Client, mint_token: str) -> None:
    before = int(time.time())
    answer = await mint_ok(origin, {"text": TEXT})
    after = int(time.time())
    assert isinstance(answer["url"], str)
    assert answer["key"] == spec_of().key
    assert before + 3600 <= answer["expires_at"] <= after + 3600  # the default ttl


async def test_minted_url_starts_with_the_public_base(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": TEXT})
    assert answer["url"].startswith(f"{PUBLIC_BASE}/v1/speech/{answer['key']}.wav?")


async def test_minted_url_verifies_and_its_key_is_the_spec_key(
    origin: Client, mint_token: str
) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "voice": "joe"})
    grant = verified(answer["url"])
    expected = spec_of(voice="joe")
    assert grant.spec == expected
    assert grant.spec.key == expected.key == answer["key"]
    assert grant.policy is Policy.HOT
    assert grant.network is None
    assert grant.expires == answer["expires_at"]


async def test_mint_normalizes_the_text_like_the_spec(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": f"  {TEXT.replace(' ', '   ')}\n"})
    assert answer["key"] == spec_of().key


async def test_mint_honours_ttl(origin: Client, mint_token: str) -> None:
    before = int(time.time())
    answer = await mint_ok(origin, {"text": TEXT, "ttl": 120})
    after = int(time.time())
    assert before + 120 <= answer["expires_at"] <= after + 120
    assert verified(answer["url"]).expires == answer["expires_at"]


async def test_mint_accepts_the_maximum_ttl(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "ttl": MAX_TTL})
    assert verified(answer["url"]).expires == answer["expires_at"]


@pytest.mark.parametrize("policy", list(Policy))
async def test_mint_honours_policy(origin: Client, mint_token: str, policy: Policy) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "policy": policy.value})
    assert verified(answer["url"]).policy is policy
    assert dict(parse_qsl(urlsplit(answer["url"]).query))["p"] == policy.value


async def test_mint_honours_ip(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "ip": "203.0.113.0/24"})
    grant = verified(answer["url"], client_ip="203.0.113.7")
    assert grant.network == ipaddress.ip_network("203.0.113.0/24")


async def test_ip_bound_minted_url_refuses_another_client(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "ip": "203.0.113.0/24"})
    with pytest.raises(Forbidden) as refused:
        verified(answer["url"], client_ip="198.51.100.1")
    assert refused.value.code == "ip_mismatch"


@pytest.mark.parametrize("fmt", list(AudioFormat))
async def test_mint_honours_format(origin: Client, mint_token: str, fmt: AudioFormat) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "format": fmt.value})
    assert urlsplit(answer["url"]).path.endswith(f"/{answer['key']}.{fmt.value}")
    assert verified(answer["url"]).spec.format is fmt
    assert answer["key"] == spec_of(fmt=fmt).key


async def test_mint_honours_speed(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "speed": 1.25})
    assert verified(answer["url"]).spec.speed == 1.25
    assert answer["key"] == spec_of(speed=1.25).key


async def test_mint_accepts_an_integer_speed(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "speed": 2})
    assert verified(answer["url"]).spec.speed == 2.0


async def test_mint_honours_seed(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": TEXT, "seed": 7})
    assert verified(answer["url"]).spec.seed == 7
    assert answer["key"] == spec_of(seed=7).key
    assert answer["key"] != spec_of().key


async def test_text_never_appears_in_the_minted_url(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": "Secretive marmalade sentence."})
    assert "marmalade" not in answer["url"].lower()


# -- authentication -----------------------------------------------------------------------


async def test_missing_token_is_401_with_challenge(origin: Client, mint_token: str) -> None:
    async with origin.post("/v1/speech", json={"text": TEXT}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "unauthorized"


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN, f"bearer{TOKEN}"],
    ids=["wrong", "empty", "basic", "bare", "no-space"],
)
async def test_wrong_token_is_401_with_challenge(
    origin: Client, mint_token: str, authorization: str
) -> None:
    headers = {"Authorization": authorization}
    async with origin.post("/v1/speech", json={"text": TEXT}, headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "unauthorized"


async def test_admin_token_does_not_mint(
    origin: Client, mint_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEARVOICE_ADMIN_TOKEN", "admin-token-for-tests-0123456789")
    headers = {"Authorization": "Bearer admin-token-for-tests-0123456789"}
    status, answer = await post(origin, {"text": TEXT}, headers=headers)
    assert status == 401
    assert answer["error"] == "unauthorized"


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
async def test_without_a_mint_token_minting_is_disabled(
    origin: Client, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(MINT_TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(MINT_TOKEN_ENV, value)
    status, answer = await post(origin, {"text": TEXT})
    assert status == 403
    assert answer["error"] == "mint_disabled"


async def test_unauthenticated_bad_body_is_401_not_400(origin: Client, mint_token: str) -> None:
    """The token is checked before the body is looked at."""
    async with origin.post("/v1/speech", data=b"{not json") as resp:
        assert resp.status == 401


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"\xff\xfe", b"[]", b'"text"', b"null"],
    ids=["broken", "empty", "not-utf8", "list", "string", "null"],
)  # fmt: skip
async def test_bad_json_is_400(origin: Client, mint_token: str, raw: bytes) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    status, answer = await post(origin, data=raw, headers=headers)
    assert status == 400
    assert answer["error"] == "bad_json"


async def test_unknown_field_is_400(origin: Client, mint_token: str) -> None:
    status, answer = await post(origin, {"text": TEXT, "volume": 11})
    assert status == 400
    assert answer["error"] == "unknown_field"
    assert "volume" in answer["message"]


async def test_missing_text_is_400(origin: Client, mint_token: str) -> None:
    status, answer = await post(origin, {"voice": "heart"})
    assert status == 400
    assert answer["error"] == "missing_text"


async def test_empty_text_is_400(origin: Client, mint_token: str) -> None:
    status, answer = await post(origin, {"text": " \n\t "})
    assert status == 400
    assert answer["error"] == "empty_text"


async def test_unknown_voice_is_400_with_the_known_voices(origin: Client, mint_token: str) -> None:
    status, answer = await post(origin, {"text": TEXT, "voice": "nobody"})
    assert status == 400
    assert answer["error"] == "unknown_voice"
    assert {"heart", "joe"} <= set(answer["known"])


async def test_unknown_format_is_400_with_the_known_formats(
    origin: Client, mint_token: str
) -> None:
    status, answer = await post(origin, {"text": TEXT, "format": "aiff"})
    assert status == 400
    assert answer["error"] == "unsupported_format"
    assert set(answer["known"]) == {f.value for f in AudioFormat}


async def test_unknown_policy_is_400(origin: Client, mint_token: str) -> None:
    status, answer = await post(origin, {"text": TEXT, "policy": "forever"})
    assert status == 400
    assert answer["error"] == "bad_policy"


@pytest.mark.parametrize("speed", [0.49, 2.01, 0, -1, 100, "fast", None, True])
async def test_speed_out_of_bounds_is_400(origin: Client, mint_token: str, speed: Any) -> None:
    status, answer = await post(origin, {"text": TEXT, "speed": speed})
    assert status == 400
    assert answer["error"] == "bad_speed"


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL + 1, 1.5, "60", True, None])
async def test_bad_ttl_is_400(origin: Client, mint_token: str, ttl: Any) -> None:
    status, answer = await post(origin, {"text": TEXT, "ttl": ttl})
    assert status == 400
    assert answer["error"] == "bad_ttl"


@pytest.mark.parametrize("ip", ["not-an-ip", "300.1.2.3", "10.0.0.0/33", "1.2.3.4/x"])
async def test_bad_ip_is_400(origin: Client, mint_token: str, ip: str) -> None:
    status, answer = await post(origin, {"text": TEXT, "ip": ip})
    assert status == 400
    assert answer["error"] == "bad_ip"


@pytest.mark.parametrize("seed", [1.5, "7", True])
async def test_bad_seed_is_400(origin: Client, mint_token: str, seed: Any) -> None:
    status, answer = await post(origin, {"text": TEXT, "seed": seed})
    assert status == 400
    assert answer["error"] == "bad_seed"


async def test_text_over_the_limit_is_400(origin: Client, mint_token: str) -> None:
    status, answer = await post(origin, {"text": "x" * (MAX_TEXT + 1)})
    assert status == 400
    assert answer["error"] == "text_too_long"


async def test_text_at_the_limit_is_minted(origin: Client, mint_token: str) -> None:
    answer = await mint_ok(origin, {"text": "x" * MAX_TEXT})
    assert len(verified(answer["url"]).spec.text) == MAX_TEXT


async def test_the_limit_counts_normalized_text(origin: Client, mint_token: str) -> None:
    """Whitespace runs collapse before the length check, as at the edge."""
    answer = await mint_ok(origin, {"text": "x " + " " * MAX_TEXT + "y"})
    assert verified(answer["url"]).spec.text == "x y"


async def test_non_string_text_is_400(origin: Client, mint_token: str) -> None:
    status, answer = await post(origin, {"text": 42})
    assert status == 400
    assert answer["error"] == "bad_text"
