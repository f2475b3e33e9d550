"""A hung upstream through a whole node: a miss waits at most `[upstream] deadline` for its
first byte, and once the breaker of the only upstream is open, misses fail at once: a
stale copy if the node has one, else 503 `circuit_open` with Retry-After. The upstream is
a real loopback server that accepts the request and never answers (as a stopped process
does), so which requests reached it shows what the node did."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.policy import Retention
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.upstream import UpstreamSettings
from tests.support import make_config, make_keyring, make_spec, payload, put_object, sign
from tests.test_upstream_resilience import Mode, peers

KEYRING = make_keyring()
SETTINGS = UpstreamSettings(
    connect_timeout=0.2,
    first_byte_timeout=0.3,
    deadline=0.4,
    failure_threshold=2,
    open_seconds=60.0,
    retries=2,
    backoff_base=0.0,
    backoff_max=0.0,
)


def joe(text: str) -> Any:
    return make_spec(text, voice="joe", model=piper_model_id("joe"))


async def test_a_hung_upstream_is_bounded_by_the_deadline_then_fails_fast(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    async with peers(Mode.HANG) as (hung,):
        config = make_config(tmp_path, upstreams=(hung.base,), upstream=SETTINGS)
        app = create_app(config, KEYRING, engines=[])
        client = await aiohttp_client(app)
        stale_spec = joe("an old line the edge still has")
        stale_body = payload(3000, 5)
        put_object(app, stale_spec, stale_body, stored_at=time.time() - Retention().hot - 600)

        # Each miss spends its deadline: one whole attempt and the rest of a second,
        # never three rounds.
        async with client.get(sign(KEYRING, joe("first cold miss"))) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"] == "upstream_timeout"
        assert hung.gets == 2
        async with client.get(sign(KEYRING, joe("second cold miss"))) as resp:
            assert resp.status == 504
        # Its first attempt was the second full timeout, which opened the breaker: no
        # round is left to retry.
        assert hung.gets == 3

        async with client.get(sign(KEYRING, joe("third cold miss"))) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "circuit_open"
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
        async with client.get(sign(KEYRING, stale_spec)) as resp:
            assert resp.status == 200
            assert await resp.read() == stale_body
            assert int(resp.headers["Age"]) >= Retention().hot
        assert hung.gets == 3, "the hung upstream was asked again behind an open breaker"
