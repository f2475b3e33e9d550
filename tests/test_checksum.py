"""End-to-end checksums on node-to-node transfers (X-Nearvoice-Sha256).

A node that answers with a complete object sends the hex SHA-256 of the whole object;
a stream of an object still in flight cannot, so the fetching node confirms it afterwards
with a node-signed HEAD (`Upstreams.verify`). The nodes here are real edge apps on
loopback (no engines; objects put straight into their stores, or fetched from a peer);
corrupting upstreams are the fault-injecting `Peer`s of test_upstream_resilience.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nearvoice.edge.app import create_app
from nearvoice.edge.node import Node
from nearvoice.edge.spec import Spec
from nearvoice.edge.upstream import CHECKSUM_HEADER, UpstreamSettings
from tests.support import (
    eventually,
    make_config,
    make_keyring,
    make_spec,
    node_of,
    payload,
    put_object,
    sign,
    wait_ready,
)
from tests.test_upstream_resilience import BODY, DIGEST, Mode, client, peers

KEYRING = make_keyring()
PLAYER_ADDRESS = "127.0.0.2"
_CASES = itertools.count(1)
Client = TestClient[Any, Any]


def spec() -> Spec:
    return make_spec(f"Checksum case {next(_CASES)}.")


@dataclass
class Edge:
    app: web.Application
    server: TestServer
    client: Client

    @property
    def node(self) -> Node:
        return node_of(self.app)

    @property
    def base(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def idle(self) -> bool:
        return not any(fill.is_running() for fill in self.node._fills.values())


@asynccontextmanager
async def edge(tmp_path: Path, upstreams: tuple[str, ...] = ()) -> AsyncIterator[Edge]:
    """A real edge app that renders nothing itself."""
    settings = UpstreamSettings(first_byte_timeout=2.0, retries=0)
    config = make_config(tmp_path, upstreams=upstreams, upstream=settings)
    app = create_app(config, KEYRING, engines=[])
    server = TestServer(app)
    async with TestClient(server) as test_client:
        await wait_ready(test_client)
        yield Edge(app, server, test_client)


# -- the header on answers about complete objects ------------------------------------------


@pytest.mark.parametrize("connection", ["keep-alive", "close"])  # direct and aiohttp paths
async def test_full_answer_of_a_complete_object_carries_its_sha256(
    tmp_path: Path, connection: str
) -> None:
    body = payload(150_000, seed=3)
    async with edge(tmp_path) as e:
        s = spec()
        put_object(e.app, s, body)
        async with e.client.get(sign(KEYRING, s), headers={"Connection": connection}) as resp:
            assert resp.status == 200
            assert await resp.read() == body
            assert resp.headers[CHECKSUM_HEADER] == hashlib.sha256(body).hexdigest()


async def test_head_range_and_304_carry_the_digest_of_the_whole_object(tmp_path: Path) -> None:
    body = payload(50_000, seed=4)
    digest = hashlib.sha256(body).hexdigest()
    async with edge(tmp_path) as e:
        s = spec()
        meta = put_object(e.app, s, body)
        url = sign(KEYRING, s)
        async with e.client.head(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(body))
            assert resp.headers[CHECKSUM_HEADER] == digest
        async with e.client.get(url, headers={"Range": "bytes=10-99"}) as resp:
            assert resp.status == 206
            assert await resp.read() == body[10:100]
            assert resp.headers[CHECKSUM_HEADER] == digest  # of the representation
        async with e.client.get(url, headers={"If-None-Match": meta.etag}) as resp:
            assert resp.status == 304
            assert resp.headers[CHECKSUM_HEADER] == digest


async def test_stream_of_an_object_in_flight_has_no_digest(tmp_path: Path) -> None:
    async with peers(Mode.STREAM) as (origin,), edge(tmp_path, (origin.base,)) as e:
        s = spec()
        async with e.client.get(sign(KEYRING, s)) as resp:
            assert resp.status == 200
            first = await resp.content.readany()
            assert first
            assert e.node._fills[s.key].is_running()
            assert CHECKSUM_HEADER not in resp.headers
            origin.go.set()
            assert first + await resp.read() == BODY
        await eventually(e.idle)


# -- what the fetching node sees (Fetched.sha256, verify, confirm) -------------------------


async def test_fetched_exposes_the_digest_and_base_of_a_complete_object(tmp_path: Path) -> None:
    body = payload(80_000, seed=5)
    digest = hashlib.sha256(body).hexdigest()
    async with edge(tmp_path) as e, client(e.base) as up:
        s = spec()
        put_object(e.app, s, body)
        target = sign(KEYRING, s)
        async with up.fetch(s.key, target) as fetched:
            assert fetched.base == e.base
            assert fetched.sha256 == digest
            received = b"".join([chunk async for chunk in fetched.chunks()])
        assert received == body
        assert await up.confirm(s.key, target, fetched, len(received), digest)
        assert await up.verify(s.key, target, e.base, len(body), digest)
        assert not await up.verify(s.key, target, e.base, len(body) - 1, digest)
        other = hashlib.sha256(body[:-1]).hexdigest()
        assert not await up.verify(s.key, target, e.base, len(body), other)
        assert not await up.confirm(s.key, target, fetched, len(body), other)


async def test_object_streamed_in_flight_is_verified_afterwards_with_a_head(
    tmp_path: Path,
) -> None:
    # client -> edge E (fetching from a slow origin, so E streams the object in flight).
    async with (
        peers(Mode.STREAM) as (origin,),
        edge(tmp_path, (origin.base,)) as e,
        client(e.base) as up,
    ):
        s = spec()
        target = sign(KEYRING, s)
        async with up.fetch(s.key, target) as fetched:
            assert fetched.sha256 is None
            chunks = fetched.chunks()
            received = await anext(chunks)
            origin.go.set()
            received += b"".join([chunk async for chunk in chunks])
        assert received == BODY
        assert await up.confirm(s.key, target, fetched, len(received), DIGEST)
        assert not await up.verify(s.key, target, e.base, len(BODY), "0" * 64)
        assert origin.gets == 1  # E answered the HEADs itself


@pytest.mark.parametrize("fault", [Mode.BAD_DIGEST, Mode.NO_DIGEST, Mode.WRONG_LENGTH])
async def test_verify_is_false_unless_the_upstream_confirms_length_and_digest(
    fault: Mode,
) -> None:
    async with peers(fault) as (a,), client(a.base) as up:
        assert not await up.verify("k", "/v1/speech/k.wav?x=1", a.base, len(BODY), DIGEST)
        assert a.seen == ["HEAD"]


async def test_verify_is_true_for_a_correct_object() -> None:
    async with peers(Mode.OK) as (a,), client(a.base) as up:
        assert await up.verify("k", "/v1/speech/k.wav?x=1", a.base, len(BODY), DIGEST)
        assert await up.verify("k", "/v1/speech/k.wav?x=1", a.base, len(BODY), DIGEST.upper())


@pytest.mark.parametrize("fault", [Mode.UNAVAILABLE, Mode.REFUSED, Mode.CLOSE])
async def test_verify_is_false_when_the_upstream_does_not_answer_200(fault: Mode) -> None:
    async with peers(fault) as (a,), client(a.base) as up:
        assert not await up.verify("k", "/v1/speech/k.wav?x=1", a.base, len(BODY), DIGEST)


async def test_a_tampered_digest_fails_confirm() -> None:
    async with peers(Mode.BAD_DIGEST) as (a,), client(a.base) as up:
        async with up.fetch("k", "/v1/speech/k.wav?x=1") as fetched:
            assert fetched.sha256 is not None and fetched.sha256 != DIGEST
            received = b"".join([chunk async for chunk in fetched.chunks()])
        assert received == BODY
        assert not await up.confirm("k", "/v1/speech/k.wav?x=1", fetched, len(BODY), DIGEST)


async def test_verify_of_an_ip_bound_url_is_vouched_for_by_the_node_signature(
    tmp_path: Path,
) -> None:
    body = payload(10_000, seed=6)
    async with edge(tmp_path) as e, client(e.base) as up:
        s = spec()
        put_object(e.app, s, body)
        target = sign(KEYRING, s, ip=f"{PLAYER_ADDRESS}/32")  # we talk from 127.0.0.1
        digest = hashlib.sha256(body).hexdigest()
        assert await up.verify(s.key, target, e.base, len(body), digest)


# -- nothing corrupt is cached (the producer's side) ---------------------------------------


async def served_and_cached(e: Edge, s: Spec) -> tuple[int, bool]:
    """GETs `s` through `e`; the status and whether `e` then holds the object."""
    async with e.client.get(sign(KEYRING, s)) as resp:
        status = resp.status
        try:
            await resp.read()
        except Exception:  # a broken transfer is one of the expected outcomes
            status = -1
    await eventually(e.idle)
    return status, e.node.store.contains(s.key)


@pytest.mark.parametrize("fault", [Mode.SHORT, Mode.BREAK])
async def test_a_truncated_upstream_body_is_not_cached(tmp_path: Path, fault: Mode) -> None:
    async with peers(fault) as (origin,), edge(tmp_path, (origin.base,)) as e:
        s = spec()
        _, cached = await served_and_cached(e, s)
        assert not cached
        origin.mode = Mode.OK
        status, cached = await served_and_cached(e, s)
        assert (status, cached) == (200, True)


async def test_a_body_that_does_not_match_its_digest_header_is_not_cached(
    tmp_path: Path,
) -> None:
    async with peers(Mode.BAD_DIGEST) as (origin,), edge(tmp_path, (origin.base,)) as e:
        s = spec()
        _, cached = await served_and_cached(e, s)
        assert not cached


async def test_a_stream_the_upstream_does_not_confirm_is_not_cached(tmp_path: Path) -> None:
    async with peers(Mode.STREAM) as (origin,), edge(tmp_path, (origin.base,)) as e:
        s = spec()
        async with e.client.get(sign(KEYRING, s)) as resp:
            assert resp.status == 200
            assert await resp.content.readany()  # streamed in flight, without a digest
            origin.mode = Mode.BAD_DIGEST  # the HEAD that confirms it will name other bytes
            origin.go.set()
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await resp.read()
        await eventually(e.idle)
        assert origin.seen == ["GET", "HEAD"]
        assert not e.node.store.contains(s.key)
