"""Inputs that used to end in a 500, on a real node: a bearer token that is not ASCII (or
not even UTF-8), JSON nested too deeply for Python's parser, and digits that are digits
to `str.isdigit` but not to `int` ("²"). Each gets its 4xx JSON answer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.errors import BadRequest
from nearvoice.edge.http.requests import MAX_JSON_DEPTH, json_depth, loads_bounded
from nearvoice.edge.nodeauth import NODE_HEADER
from tests.support import EdgeTestServer, make_config, make_keyring, make_spec, sign

Client = TestClient[Any, Any]
TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Client:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    app = create_app(make_config(tmp_path), make_keyring(), engines=[])
    return await aiohttp_client(EdgeTestServer(app))


async def raw(client: Client, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head + body)
    await writer.drain()
    async with asyncio.timeout(10):
        answer_head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in answer_head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answer = await reader.readexactly(length)
    writer.close()
    return int(answer_head.split()[1]), json.loads(answer)


@pytest.mark.parametrize("token", ["é-token".encode(), b"\xff\xfe-token", "²".encode()])
async def test_a_bearer_token_that_is_not_ascii_is_401(client: Client, token: bytes) -> None:
    head = b"GET /admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    status, answer = await raw(client, head)
    assert status == 401
    assert answer["error"] == "unauthorized"


async def test_deeply_nested_json_to_purge_is_400(client: Client) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    head = (
        b"POST /admin/purge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    status, answer = await raw(client, head, body)
    assert status == 400
    assert answer["error"] == "bad_json"


async def test_superscript_digits_in_hotkeys_k_are_400(client: Client) -> None:
    async with client.get("/admin/hotkeys?k=²", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "bad_k"


@pytest.mark.parametrize("stamp", ["²", "\u0661\u0662\u0663", "\U0001d7d9\U0001d7da\U0001d7db"])
async def test_a_node_signature_stamp_of_unicode_digits_is_ignored(
    client: Client, stamp: str
) -> None:
    url = sign(make_keyring(), make_spec("stamp"), ip="192.0.2.1/32")
    value = f"v2:test1:{stamp}:bm9uY2U:c2ln"
    head = f"GET {url} HTTP/1.1\r\nHost: x\r\n{NODE_HEADER}: {value}\r\n\r\n".encode()
    status, answer = await raw(client, head)
    assert status == 403  # the signature does not vouch; the URL's ip binding stands
    assert answer["error"] == "ip_mismatch"
    legacy = f"test1:{stamp}:c2ln"
    head = f"GET {url} HTTP/1.1\r\nHost: x\r\n{NODE_HEADER}: {legacy}\r\n\r\n".encode()
    assert (await raw(client, head))[0] == 403


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth('{"a": "[[[[[[[[", "b": [1, {"c": "\\"]"}]}') == 3
    assert json_depth("[" * 40) == 40
    with pytest.raises(BadRequest):
        loads_bounded("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert loads_bounded("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
