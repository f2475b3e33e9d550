"""Logs that leak nothing (edge.http.logs): `s`, `sig`, `token` and Authorization values
are masked in every line, the access log included; the access log can be JSON; and the
fast path writes the same records as aiohttp's path while staying on."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.config import HttpSettings
from nearvoice.edge.http.logs import MASK, RedactingFilter, access_logger_class, redact
from tests.support import (
    EdgeTestServer,
    fast_answers,
    make_config,
    make_keyring,
    make_spec,
    payload,
    put_object,
    sign,
)

Client = TestClient[Any, Any]
KEYRING = make_keyring()
BODY = payload(3000, seed=4)


def test_redact_masks_credentials_and_keeps_the_rest() -> None:
    line = (
        'GET /v1/speech/abc.wav?s=SEALED&exp=1&kid=k1&p=hot&sig=SIGNATURE HTTP/1.1" 200 '
        "Authorization: Bearer SECRET-TOKEN token=T0K&x=1"
    )
    cleaned = redact(line)
    for secret in ("SEALED", "SIGNATURE", "SECRET-TOKEN", "T0K"):
        assert secret not in cleaned
    for kept in ("exp=1", "kid=k1", "p=hot", "x=1", "/v1/speech/abc.wav"):
        assert kept in cleaned
    assert cleaned.count(MASK) == 4
    assert redact("{'Authorization': 'Basic dXNlcjpwYXNz'}").count("dXNlcjpwYXNz") == 0


def test_the_filter_redacts_formatted_arguments() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "asked for %s", ("/a?sig=S1",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"asked for /a?sig={MASK}"


async def start(
    aiohttp_client: AiohttpClient, tmp_path: Path, fmt: str, fast: bool = True
) -> Client:
    config = make_config(
        tmp_path, http=HttpSettings(access_log=True, access_log_format=fmt, fast_path=fast)
    )
    app = create_app(config, KEYRING, engines=[])
    server = EdgeTestServer(
        app,
        access_log=logging.getLogger("aiohttp.access"),
        access_log_class=access_logger_class(fmt),
    )
    return await aiohttp_client(server)


async def get_twice(client: Client, target: str) -> None:
    """Two GETs on one keep-alive connection, the second one a fast-path candidate."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\nUser-Agent: tester/1\r\n\r\n".encode()
    for _ in range(2):
        writer.write(head)
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in answer.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
    writer.close()


async def records_after(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """The access log's messages once there are `count` (written after each response)."""
    async with asyncio.timeout(10):
        while True:
            lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
            if len(lines) >= count:
                return lines
            await asyncio.sleep(0.01)


async def test_json_access_log_from_both_paths_has_no_secrets(
    aiohttp_client: AiohttpClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(aiohttp_client, tmp_path, "json")
    spec = make_spec("json log")
    put_object(client.server.app, spec, BODY)
    target = sign(KEYRING, spec)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        await get_twice(client, target)
        lines = await records_after(caplog, 2)
    assert fast_answers(client) == 1  # access logging no longer turns the fast path off
    first, second = (json.loads(line) for line in lines[:2])
    for record in (first, second):
        assert record["status"] == 200
        assert record["bytes"] == len(BODY)
        assert record["method"] == "GET"
        assert record["user_agent"] == "tester/1"
        assert record["remote"] == "127.0.0.1"
        assert "sig=" + MASK in record["target"] and "s=" + MASK in record["target"]
    assert set(first) == set(second)
    secrets = [
        v for k, v in (p.split("=") for p in target.split("?")[1].split("&")) if k in "s sig"
    ]
    for line in lines:
        for secret in secrets:
            assert secret not in line


async def test_text_access_log_is_redacted_too(
    aiohttp_client: AiohttpClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(aiohttp_client, tmp_path, "text", fast=False)
    spec = make_spec("text log")
    put_object(client.server.app, spec, BODY)
    target = sign(KEYRING, spec)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        await get_twice(client, target)
        lines = await records_after(caplog, 2)
    assert all(f"sig={MASK}" in line and " 200 " in line for line in lines[:2])


def test_an_unknown_access_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="access_log_format"):
        access_logger_class("xml")
