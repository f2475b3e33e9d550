"""The memory a storm of misses may take: `[memory] fill_budget` bounds the bodies held by
fills. A real upstream streams half an object and holds the rest until the test lets it
go, so the fills' size is known when the next miss arrives."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.memory import MemorySettings, apply_allocator_settings
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.upstream import UpstreamSettings
from tests.support import eventually, make_config, make_keyring, make_spec, node_of, sign
from tests.test_upstream_resilience import BODY, Mode, peers

KEYRING = make_keyring()


def joe(text: str) -> Any:
    return make_spec(text, voice="joe", model=piper_model_id("joe"))


async def test_misses_past_the_fill_budget_are_refused_until_fills_end(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    budget = len(BODY) // 4  # half a body in production is over it
    async with peers(Mode.STREAM) as (upstream,):
        config = make_config(
            tmp_path,
            upstreams=(upstream.base,),
            upstream=UpstreamSettings(retries=0),
            memory=MemorySettings(fill_budget=budget),
        )
        app = create_app(config, KEYRING, engines=[])
        client = await aiohttp_client(app)
        node = node_of(app)

        async def get(text: str) -> tuple[int, bytes, dict[str, str]]:
            async with client.get(sign(KEYRING, joe(text))) as resp:
                return resp.status, await resp.read(), dict(resp.headers)

        first = asyncio.create_task(get("the first miss"))
        await eventually(lambda: sum(f.size for f in node._fills.values()) >= budget)
        status, body, headers = await get("a second miss")
        assert status == 503
        assert b"memory_budget" in body
        assert headers["Retry-After"] == "1"
        assert upstream.gets == 1  # refused before anything was asked of the upstream

        upstream.go.set()
        status, body, _ = await first
        assert (status, body) == (200, BODY)
        # The finished fill lingers to be joined, but it is let go for a new miss.
        status, body, _ = await get("a third miss")
        assert (status, body) == (200, BODY)


def test_the_allocator_threshold_is_set_where_the_c_library_is_glibc() -> None:
    import platform

    applied = apply_allocator_settings(MemorySettings())
    assert applied == (platform.libc_ver()[0] == "glibc")
    assert not apply_allocator_settings(MemorySettings(mmap_threshold=0))
