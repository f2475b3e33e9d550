"""An upstream 200 whose body breaks off after the edge has started streaming it: the
player gets a broken transfer (never a short body that looks whole), and the request is
counted as an error, with the bytes that did go out. The upstreams are real loopback
servers that break the body on purpose (tests/test_upstream_resilience.py's Peer)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.upstream import UpstreamSettings
from tests.support import make_config, make_keyring, make_spec, metric, node_of, sign
from tests.test_upstream_resilience import BODY, Mode, peers

KEYRING = make_keyring()


@pytest.mark.parametrize("fault", [Mode.SHORT, Mode.BREAK])
async def test_a_body_cut_short_upstream_counts_as_an_error(
    aiohttp_client: AiohttpClient, tmp_path: Path, fault: Mode
) -> None:
    async with peers(fault) as (upstream,):
        config = make_config(
            tmp_path, upstreams=(upstream.base,), upstream=UpstreamSettings(retries=0)
        )
        app = create_app(config, KEYRING, engines=[])
        client = await aiohttp_client(app)
        spec = make_spec("cut short upstream", voice="joe", model=piper_model_id("joe"))
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(sign(KEYRING, spec)) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert 0 < len(received) < len(BODY)
        assert await metric(client, "nearvoice_requests_total", result="error") == 1
        assert await metric(client, "nearvoice_requests_total", result="miss") == 0
        sent = await metric(client, "nearvoice_response_bytes_total", source="upstream")
        assert sent >= len(received)
        assert not node_of(app).store.contains(spec.key)
