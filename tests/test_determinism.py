"""Renders are deterministic (docs/contracts.md#spec-and-key): two nodes with separate data
directories render the same signed spec to byte-identical objects, for voice `heart`
(hibari, 24 kHz, seeded noise) and voice `joe` (piper, 22.05 kHz, zero noise scales),
in every delivery format."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nearvoice.edge.app import create_app
from nearvoice.edge.config import SynthSettings
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.node import Node
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.piper_engine import piper_model_id
from tests.support import (
    make_config,
    make_keyring,
    make_spec,
    node_of,
    sign,
    wait_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

Client = TestClient[Any, Any]
KEYRING = make_keyring()
TEXT = "Generate near, deliver near. Every node renders the same bytes."
CASES = [("heart", fmt) for fmt in AudioFormat] + [("joe", fmt) for fmt in AudioFormat]


@dataclass
class Edge:
    app: web.Application
    client: Client

    @property
    def node(self) -> Node:
        return node_of(self.app)


@dataclass
class Two:
    one: Edge
    two: Edge


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def nodes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Two]:
    """Two independent nodes rendering heart and joe with their default (real) engines."""
    synth = SynthSettings(workers=1, voices=("heart", "joe"))
    apps = [
        create_app(make_config(tmp_path_factory.mktemp(name), synth=synth), KEYRING)
        for name in ("one", "two")
    ]
    async with TestClient(TestServer(apps[0])) as one, TestClient(TestServer(apps[1])) as two:
        await wait_ready(one)
        await wait_ready(two)
        yield Two(Edge(apps[0], one), Edge(apps[1], two))


def spec_for(voice: str, fmt: AudioFormat) -> Spec:
    model = piper_model_id("joe") if voice == "joe" else None
    return make_spec(TEXT, voice=voice, fmt=fmt, model=model)


async def render(edge: Edge, spec: Spec) -> bytes:
    async with edge.client.get(sign(KEYRING, spec)) as resp:
        body = await resp.read()
        assert resp.status == 200, body[:300]
    return body


def case_id(case: tuple[str, AudioFormat]) -> str:
    return f"{case[0]}-{case[1].value}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
async def test_two_nodes_render_byte_identical_objects(
    nodes: Two, case: tuple[str, AudioFormat]
) -> None:
    spec = spec_for(*case)
    first = await render(nodes.one, spec)
    second = await render(nodes.two, spec)
    assert len(first) > 1000
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    assert first == second
