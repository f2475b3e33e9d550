"""Helpers for the OpenAI-compatible API tests: a real node on loopback with tenants, and
the official `openai` SDK pointed at it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openai
from aiohttp import web
from aiohttp.test_utils import TestClient

from nearvoice.edge.apikeys import ApiKeys
from nearvoice.edge.app import create_app
from nearvoice.edge.config import ApiSettings, NodeConfig, TenantSettings
from nearvoice.edge.node import Node
from nearvoice.edge.policy import Policy
from nearvoice.edge.synth.engine import Engine
from tests.support import EdgeTestServer, make_keyring, node_of, scrape, wait_ready

KEYRING = make_keyring()
ACME = "acme-secret-0123456789abcdef"
DRAFTY = "drafty-secret-0123456789abcdef"
LIMITED = "limited-secret-0123456789abcdef"
API_KEYS = ApiKeys.parse(f"acme:{ACME},drafty:{DRAFTY},limited:{LIMITED}")
API_SETTINGS = ApiSettings(
    voices={"alloy": "heart"},
    tenants={
        "drafty": TenantSettings(policy=Policy.DRAFT),
        # Rates so low that no token comes back during a test: the bursts are the budget.
        "limited": TenantSettings(hit_rate=0.001, hit_burst=2, miss_rate=0.001, miss_burst=1),
    },
)

Client = TestClient[Any, Any]


@dataclass
class ApiNode:
    app: web.Application
    server: EdgeTestServer
    client: Client
    sdks: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def node(self) -> Node:
        return node_of(self.app)

    @property
    def base(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def sdk(self, key: str = ACME) -> openai.AsyncOpenAI:
        """The official SDK with this node as its base URL; no retries, so each call is
        one request."""
        sdk = openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0)
        self.sdks.append(sdk)
        return sdk

    async def metrics(self) -> str:
        return await scrape(self.client)

    def idle(self) -> bool:
        return not any(fill.is_running() for fill in self.node._fills.values())


@asynccontextmanager
async def api_node(
    config: NodeConfig, engines: list[Engine], keys: ApiKeys = API_KEYS
) -> AsyncIterator[ApiNode]:
    app = create_app(config, KEYRING, engines=engines, api_keys=keys)
    server = EdgeTestServer(app)
    async with TestClient(server) as client:
        await wait_ready(client)
        node = ApiNode(app, server, client)
        try:
            yield node
        finally:
            for sdk in node.sdks:
                await sdk.close()


@dataclass
class Speech:
    status: int
    headers: dict[str, str]
    body: bytes


async def speak(sdk: openai.AsyncOpenAI, **params: Any) -> Speech:
    """One `audio.speech` call through the SDK's streaming response, read with iter_bytes."""
    params.setdefault("model", "tts-1")
    params.setdefault("voice", "heart")
    async with sdk.audio.speech.with_streaming_response.create(**params) as response:
        body = b"".join([chunk async for chunk in response.iter_bytes()])
        return Speech(response.status_code, dict(response.headers), body)


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON of each `data:` event of a text/event-stream body."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block[len("data: ") :]))
    return events


def sse_audio(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"
    )


def _probe(path: Path) -> dict[str, str]:
    out = subprocess.run(
        [
            "ffprobe",
            *("-v", "error"),
            *("-show_entries", "stream=codec_name,sample_rate,channels"),
            *("-of", "default=noprint_wrappers=1"),
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """Every sample ffmpeg decodes, at the stream's own decoded rate."""
    rate = int(_probe(path)["sample_rate"])
    proc = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-"],
        check=True,
        capture_output=True,
    )
    assert proc.stderr == b""
    return np.frombuffer(proc.stdout, "<i2"), rate


async def probe(path: Path) -> dict[str, str]:
    return await asyncio.to_thread(_probe, path)


async def decoded_seconds(path: Path) -> float:
    samples, rate = await asyncio.to_thread(_decode, path)
    return len(samples) / rate
