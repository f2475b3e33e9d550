"""Helpers for the realtime tests: a real node on loopback with tenants, and a session
driven through a real WebSocket client (aiohttp's `ws_connect`)."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from nearvoice.edge.config import ApiSettings, NodeConfig, SynthSettings, TenantSettings
from nearvoice.edge.realtime.settings import RealtimeSettings
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from tests.api_support import ACME, LIMITED, ApiNode, api_node
from tests.support import make_config
from tests.test_inflight import HeldEngine

REALTIME_API = ApiSettings(
    voices={"alloy": "heart"},
    tenants={
        "limited": TenantSettings(realtime_sessions=1, realtime_chars_per_second=1.0),
    },
)


class RecordingEngine(HeldEngine):
    """HeldEngine that also records, in order, the texts its renders were started for."""

    def __init__(self, inner: Engine, hold_at: int | None = None) -> None:
        super().__init__(inner, hold_at)
        self.texts: list[str] = []
        self._lock = threading.Lock()

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        with self._lock:
            self.texts.append(text)
        return super().stream(text, voice, speed, seed)


def realtime_config(tmp_path: Path, upstreams: tuple[str, ...] = (), **realtime: Any) -> NodeConfig:
    return make_config(
        tmp_path,
        synth=SynthSettings(workers=1),
        api=REALTIME_API,
        realtime=RealtimeSettings(**realtime),
        upstreams=upstreams,
    )


@asynccontextmanager
async def realtime_node(
    tmp_path: Path,
    engine: Engine | None = None,
    upstreams: tuple[str, ...] = (),
    **realtime: Any,
) -> AsyncIterator[ApiNode]:
    engine = engine or HibariEngine(("heart",), threads=1)
    config = realtime_config(tmp_path, upstreams, **realtime)
    async with api_node(config, [engine]) as node:
        yield node


@dataclass
class Received:
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[int, bytearray] = field(default_factory=dict)
    """Audio bytes per segment (binary frames between its started and its done)."""
    close_code: int | None = None
    current: int | None = None
    """The segment whose audio is arriving."""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def all_audio(self) -> bytes:
        return b"".join(self.audio[i] for i in sorted(self.audio))


async def connect(
    api: ApiNode, key: str | None = ACME, token: str | None = None
) -> aiohttp.ClientWebSocketResponse:
    headers = {"Authorization": f"Bearer {key}"} if key and token is None else {}
    params = {"token": token} if token else None
    return await api.client.ws_connect("/v1/realtime/speech", headers=headers, params=params)


async def send(ws: aiohttp.ClientWebSocketResponse, kind: str, **fields: Any) -> None:
    await ws.send_str(json.dumps({"type": kind, **fields}))


async def receive_all(
    ws: aiohttp.ClientWebSocketResponse, received: Received | None = None, until: str = ""
) -> Received:
    """Reads until the socket closes (or an event of type `until`)."""
    got = received or Received()
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY:
            assert got.current is not None, "audio outside a segment"
            got.audio[got.current] += msg.data
            continue
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        event = json.loads(msg.data)
        got.events.append(event)
        if event["type"] == "segment.started":
            got.current = event["segment"]
            got.audio[got.current] = bytearray()
        elif event["type"] == "segment.done":
            got.current = None
        if event["type"] == until:
            return got
    got.close_code = ws.close_code
    return got


async def speak(
    api: ApiNode, text: str, *, piece: int = 4, key: str = ACME, **update: Any
) -> Received:
    """One whole session: update, the text in pieces of `piece` characters, done."""
    ws = await connect(api, key)
    async with ws:
        await send(ws, "session.update", **{"voice": "heart", "format": "pcm", **update})
        for start in range(0, len(text), piece):
            await send(ws, "text.delta", text=text[start : start + piece])
        await send(ws, "text.done")
        return await receive_all(ws)


__all__ = ["ACME", "LIMITED"]
