"""Fetching misses from an upstream: two real edge apps on loopback, B the upstream of A.

Edge A renders `heart` only; edge B renders `heart` and `joe`. A `joe` miss on A is fetched
from B (reason `no_engine`), streamed, and cached on A. Requests from A to B carry a node
signature (edge.nodeauth), so B skips the client-address check that A already made;
anyone else gets that check. Admission sends misses upstream when the local queue is full
(`overload`); a dead upstream is a quick 502, and a dead first choice fails over to the
next. Plus unit tests of the rendezvous order and of node signatures.

One A/B pair serves the module (piper's model load is the dominant cost); each test uses
its own keys and reads metrics as differences.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from yarl import URL

from nearvoice.edge.app import create_app
from nearvoice.edge.config import SynthSettings
from nearvoice.edge.node import Node
from nearvoice.edge.nodeauth import MAX_AGE, NODE_HEADER, sign_node_request
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import PiperEngine, piper_model_id
from nearvoice.edge.upstream import UpstreamSettings, rendezvous_order
from tests.support import (
    eventually,
    make_config,
    make_keyring,
    make_spec,
    metric_from,
    node_of,
    scrape,
    sign,
    wait_ready,
)
from tests.test_inflight import HeldEngine

pytestmark = pytest.mark.slow
in_module_loop = pytest.mark.asyncio(loop_scope="module")

Client = TestClient[Any, Any]
KEYRING = make_keyring()
OTHER_KEYRING = make_keyring("test1:another-secret-that-is-long-enough-987")
QUICK = UpstreamSettings(connect_timeout=0.5, first_byte_timeout=1.0)
PLAYER_ADDRESS = "127.0.0.2"  # the player's loopback address; nodes talk from 127.0.0.1
_CASES = itertools.count(1)


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

    async def metrics(self) -> str:
        return await scrape(self.client)

    def idle(self) -> bool:
        """No fill is running on this node."""
        return not any(fill.is_running() for fill in self.node._fills.values())


@asynccontextmanager
async def serve(
    data: Path, engines: list[Engine], upstreams: tuple[str, ...] = (), **config: Any
) -> AsyncIterator[Edge]:
    """A real edge app on a loopback port, ready (engines warm)."""
    app = create_app(
        make_config(data, upstreams=upstreams, upstream=QUICK, **config), KEYRING, engines=engines
    )
    server = TestServer(app)
    async with TestClient(server) as client:
        await wait_ready(client)
        yield Edge(app, server, client)


@dataclass
class Pair:
    a: Edge
    b: Edge
    b_joe: HeldEngine
    """B's piper engine; it runs freely unless a test holds it."""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pair]:
    data = tmp_path_factory.mktemp("upstream")
    b_joe = HeldEngine(PiperEngine(("joe",), threads=1), hold_at=None)
    async with (
        serve(
            data / "b",
            [HibariEngine(("heart",), threads=1), b_joe],
            synth=SynthSettings(workers=1, voices=("heart", "joe")),
        ) as b,
        serve(data / "a", [HibariEngine(("heart",), threads=1)], (b.base,)) as a,
    ):
        yield Pair(a, b, b_joe)
        b_joe.release()


@pytest_asyncio.fixture(loop_scope="module")
async def ab(pair: Pair) -> AsyncIterator[Pair]:
    yield pair
    pair.b_joe.run_freely()
    for edge in (pair.a, pair.b):
        await eventually(edge.idle)


def joe(text: str = "Joe reads this line from the upstream.") -> Spec:
    """A `joe` spec with a key no other test uses."""
    return make_spec(f"{text} Case {next(_CASES)}.", voice="joe", model=piper_model_id("joe"))


def heart(text: str = "Heart renders this line.") -> Spec:
    return make_spec(f"{text} Case {next(_CASES)}.")


async def fetch(
    client: Client | aiohttp.ClientSession, url: str | URL, **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.get(url, **kwargs) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


def count(text: str, sample: str, **labels: str) -> float:
    return metric_from(text, sample, **labels)


def requests_total(text: str) -> float:
    results = ("hit", "miss", "stale", "collapsed", "bypass", "rejected", "error")
    return sum(count(text, "nearvoice_requests_total", result=r) for r in results)


def closed_port_base() -> str:
    """A loopback base URL nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- a voice A does not render -------------------------------------------------------------


@in_module_loop
async def test_joe_miss_is_fetched_from_the_upstream_with_reason_no_engine(ab: Pair) -> None:
    a_before, b_before = await ab.a.metrics(), await ab.b.metrics()
    status, headers, body = await fetch(ab.a.client, sign(KEYRING, joe()))
    assert status == 200
    assert headers["Content-Type"] == "audio/wav"
    assert body[:4] == b"RIFF"

    a_after, b_after = await ab.a.metrics(), await ab.b.metrics()
    upstream = "nearvoice_upstream_requests_total"
    fetched = count(a_after, upstream, reason="no_engine") - count(
        a_before, upstream, reason="no_engine"
    )
    assert fetched == 1
    synth = "nearvoice_synth_total"
    assert count(b_after, synth, engine="piper") - count(b_before, synth, engine="piper") == 1
    assert count(a_after, synth, engine="piper") == 0
    sent = "nearvoice_response_bytes_total"
    assert count(a_after, sent, source="upstream") - count(a_before, sent, source="upstream") == (
        len(body)
    )


@in_module_loop
async def test_fetched_object_is_byte_identical_to_the_upstreams(ab: Pair) -> None:
    url = sign(KEYRING, joe())
    status, _, via_a = await fetch(ab.a.client, url)
    assert status == 200
    status, _, from_b = await fetch(ab.b.client, url)
    assert status == 200
    assert via_a == from_b


@in_module_loop
async def test_upstream_fetch_streams_to_the_client_while_the_upstream_renders(
    ab: Pair,
) -> None:
    spec = joe("Joe starts here. Then he goes on. And he finishes the line.")
    ab.b_joe.hold(at=1)  # B pauses after its first sentence
    async with ab.a.client.get(sign(KEYRING, spec)) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        assert first
        a_fill = ab.a.node._fills.get(spec.key)
        b_fill = ab.b.node._fills.get(spec.key)
        assert a_fill is not None and a_fill.is_running() and a_fill.from_upstream
        assert b_fill is not None and b_fill.is_running()
        ab.b_joe.release()
        rest = await resp.read()
    _, _, from_b = await fetch(ab.b.client, sign(KEYRING, spec))
    assert first + rest == from_b


@in_module_loop
async def test_fetched_object_is_cached_on_the_edge(ab: Pair) -> None:
    spec = joe()
    url = sign(KEYRING, spec)
    status, _, first = await fetch(ab.a.client, url)
    assert status == 200
    await eventually(lambda: ab.a.node.store.contains(spec.key))
    a_before, b_before = await ab.a.metrics(), await ab.b.metrics()

    status, _, second = await fetch(ab.a.client, url)
    assert status == 200
    assert second == first
    a_after, b_after = await ab.a.metrics(), await ab.b.metrics()
    hits = "nearvoice_requests_total"
    assert count(a_after, hits, result="hit") - count(a_before, hits, result="hit") == 1
    # /metrics scrapes are not speech requests: B saw nothing new.
    assert requests_total(b_after) == requests_total(b_before)


# -- client-address binding across nodes ---------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def player(ab: Pair) -> AsyncIterator[aiohttp.ClientSession]:
    """A client connecting from 127.0.0.2, so A and B see different client addresses."""
    connector = aiohttp.TCPConnector(local_addr=(PLAYER_ADDRESS, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def served_through_a_to_the_player(
    ab: Pair, player: aiohttp.ClientSession, url: URL
) -> tuple[int, bytes, float]:
    """GETs `url` from the player's address; returns the status, body and the change in
    B's ip_mismatch rejections."""
    rejections = "nearvoice_token_rejections_total"
    before = count(await ab.b.metrics(), rejections, reason="ip_mismatch")
    status, _, body = await fetch(player, url)
    after = count(await ab.b.metrics(), rejections, reason="ip_mismatch")
    return status, body, after - before


@in_module_loop
async def test_ip_bound_url_sent_as_signed_is_served_through_a_node_signed_upstream_request(
    ab: Pair, player: aiohttp.ClientSession
) -> None:
    # The URL exactly as `nearvoice sign` prints it and a browser sends it: the `ip`
    # field's slash is percent-encoded (ip=127.0.0.2%2F32).
    target = sign(KEYRING, joe(), ip=f"{PLAYER_ADDRESS}/32")
    assert "%2F" in target
    url = URL(ab.a.base + target, encoded=True)
    status, body, refused_by_b = await served_through_a_to_the_player(ab, player, url)
    assert refused_by_b == 0, "B checked the client address of a node-signed request"
    assert status == 200, body[:200]
    assert body[:4] == b"RIFF"


@in_module_loop
async def test_ip_bound_url_with_a_literal_slash_is_served_through_a_node_signed_request(
    ab: Pair, player: aiohttp.ClientSession
) -> None:
    target = sign(KEYRING, joe(), ip=f"{PLAYER_ADDRESS}/32").replace("%2F", "/")
    url = URL(ab.a.base + target, encoded=True)
    status, body, refused_by_b = await served_through_a_to_the_player(ab, player, url)
    assert refused_by_b == 0
    assert status == 200, body[:200]
    assert body[:4] == b"RIFF"


@in_module_loop
async def test_ip_bound_url_from_another_address_is_refused_by_the_edge(
    ab: Pair,
) -> None:
    target = sign(KEYRING, joe(), ip=f"{PLAYER_ADDRESS}/32")
    async with ab.a.client.get(target) as resp:  # from 127.0.0.1
        assert resp.status == 403
        assert (await resp.json())["error"] == "ip_mismatch"


def node_headers(target: str, base: str = "http://127.0.0.1:1") -> dict[str, dict[str, str]]:
    """X-Nearvoice-Node values that must not vouch for `target` at `base`, by name."""
    now = time.time()
    return {
        "missing": {},
        "garbage": {NODE_HEADER: "not-a-signature"},
        "empty": {NODE_HEADER: ""},
        "wrong_key": {NODE_HEADER: sign_node_request(OTHER_KEYRING, "GET", target, base)},
        "old": {
            NODE_HEADER: sign_node_request(KEYRING, "GET", target, base, now=now - 10 * MAX_AGE)
        },
        "other_target": {NODE_HEADER: sign_node_request(KEYRING, "GET", target + "&x", base)},
        "other_method": {NODE_HEADER: sign_node_request(KEYRING, "POST", target, base)},
        "unknown_kid": {
            NODE_HEADER: sign_node_request(KEYRING, "GET", target, base).replace(
                ":test1:", ":nokid:"
            )
        },
        "other_destination": {
            NODE_HEADER: sign_node_request(KEYRING, "GET", target, "http://127.0.0.1:9")
        },
    }


@in_module_loop
@pytest.mark.parametrize("variant", list(node_headers("/")))
async def test_ip_bound_url_sent_straight_to_the_upstream_without_a_valid_node_signature_is_403(
    ab: Pair, variant: str
) -> None:
    spec = joe()
    target = sign(KEYRING, spec, ip=f"{PLAYER_ADDRESS}/32")
    b_before = await ab.b.metrics()
    url = URL(ab.b.base + target, encoded=True)
    headers = node_headers(target, ab.b.base)[variant]
    async with ab.b.client.session.get(url, headers=headers) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "ip_mismatch"
    b_after = await ab.b.metrics()
    synth = "nearvoice_synth_total"
    assert count(b_after, synth, engine="piper") == count(b_before, synth, engine="piper")
    assert not ab.b.node.store.contains(spec.key)


@in_module_loop
async def test_ip_bound_url_sent_straight_to_the_upstream_with_a_valid_node_signature_is_served(
    ab: Pair,
) -> None:
    target = sign(KEYRING, heart(), ip=f"{PLAYER_ADDRESS}/32")
    headers = {NODE_HEADER: sign_node_request(KEYRING, "GET", target, ab.b.base)}
    url = URL(ab.b.base + target, encoded=True)  # sent exactly as signed
    status, _, body = await fetch(ab.b.client.session, url, headers=headers)
    assert status == 200
    assert body[:4] == b"RIFF"


@in_module_loop
async def test_node_signature_does_not_excuse_an_expired_url(ab: Pair) -> None:
    target = sign(KEYRING, heart(), ttl=-3600)
    headers = {NODE_HEADER: sign_node_request(KEYRING, "GET", target, ab.b.base)}
    async with ab.b.client.get(target, headers=headers) as resp:
        assert resp.status == 410
        assert (await resp.json())["error"] == "expired"


# -- admission: overload -------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def overloaded(ab: Pair, tmp_path: Path) -> AsyncIterator[Edge]:
    """An edge that renders heart but admits no render (max_queue=0), B upstream."""
    async with serve(
        tmp_path,
        [HibariEngine(("heart",), threads=1)],
        (ab.b.base,),
        synth=SynthSettings(workers=1, max_queue=0),
    ) as edge:
        yield edge


@in_module_loop
async def test_full_render_queue_sends_heart_misses_upstream_with_reason_overload(
    ab: Pair, overloaded: Edge
) -> None:
    url = sign(KEYRING, heart())
    b_before = await ab.b.metrics()
    status, _, body = await fetch(overloaded.client, url)
    assert status == 200

    local = await overloaded.metrics()
    assert count(local, "nearvoice_upstream_requests_total", reason="overload") == 1
    assert count(local, "nearvoice_synth_total", engine="hibari") == 0
    b_after = await ab.b.metrics()
    synth = "nearvoice_synth_total"
    assert count(b_after, synth, engine="hibari") - count(b_before, synth, engine="hibari") == 1
    _, _, from_b = await fetch(ab.b.client, url)
    assert body == from_b


# -- upstream failures ---------------------------------------------------------------------


@in_module_loop
async def test_upstream_down_is_a_502_upstream_unavailable(tmp_path: Path) -> None:
    # An edge that renders nothing itself; its only upstream refuses connections.
    async with serve(tmp_path, [], (closed_port_base(),)) as edge:
        async with edge.client.get(sign(KEYRING, joe())) as resp:
            assert resp.status == 502
            assert resp.content_type == "application/json"
            body = await resp.json()
            assert int(resp.headers["Retry-After"]) > 0
        # Refused, not timed out: the answer did not wait for the first-byte timeout.
        assert body["error"] == "upstream_unavailable"
        metrics = await edge.metrics()
        assert count(metrics, "nearvoice_upstream_requests_total", reason="no_engine") == 1
        assert count(metrics, "nearvoice_requests_total", result="error") == 1


@in_module_loop
async def test_upstream_down_stores_nothing_and_the_next_request_tries_again(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path, [], (closed_port_base(),)) as edge:
        spec = joe()
        statuses = [(await fetch(edge.client, sign(KEYRING, spec)))[0] for _ in range(2)]
        # The first miss's three tries opened the breaker: the next one fails at once.
        assert statuses == [502, 503]
        assert not edge.node.store.contains(spec.key)
        metrics = await edge.metrics()
        assert count(metrics, "nearvoice_upstream_requests_total", reason="no_engine") == 2


@in_module_loop
async def test_dead_first_choice_fails_over_to_the_next_upstream(ab: Pair, tmp_path: Path) -> None:
    dead = closed_port_base()
    bases = (dead, ab.b.base)
    spec = heart()
    while rendezvous_order(spec.key, bases)[0] != dead:
        spec = heart()
    url = sign(KEYRING, spec)
    async with serve(tmp_path, [], bases) as edge:
        status, _, body = await fetch(edge.client, url)
        assert status == 200
        assert body[:4] == b"RIFF"
    _, _, from_b = await fetch(ab.b.client, url)
    assert body == from_b


# -- rendezvous order (unit) ---------------------------------------------------------------

BASES = tuple(f"http://shield-{n}.example:8081" for n in range(5))
KEYS = [f"{n:064x}" for n in range(2000)]


def test_rendezvous_order_is_a_permutation_of_the_bases() -> None:
    for key in KEYS[:50]:
        assert sorted(rendezvous_order(key, BASES)) == sorted(BASES)


def test_rendezvous_order_is_stable() -> None:
    for key in KEYS[:50]:
        assert rendezvous_order(key, BASES) == rendezvous_order(key, BASES)


def test_rendezvous_order_does_not_depend_on_the_configured_order() -> None:
    shuffled = (BASES[3], BASES[0], BASES[4], BASES[1], BASES[2])
    for key in KEYS[:50]:
        assert rendezvous_order(key, BASES) == rendezvous_order(key, shuffled)


def test_every_base_is_home_to_a_share_of_the_keys() -> None:
    homes = [rendezvous_order(key, BASES)[0] for key in KEYS]
    for base in BASES:
        share = homes.count(base) / len(KEYS)
        assert 0.1 < share < 0.3, (base, share)


def test_removing_a_base_moves_only_its_own_keys() -> None:
    removed = BASES[2]
    rest = tuple(b for b in BASES if b != removed)
    for key in KEYS:
        before = rendezvous_order(key, BASES)
        after = rendezvous_order(key, rest)
        if before[0] != removed:
            assert after[0] == before[0], key
        else:
            assert after[0] == before[1], key  # its next choice, not a reshuffle
        assert after == [b for b in before if b != removed]


def test_adding_a_base_moves_keys_only_to_it() -> None:
    added = "http://shield-new.example:8081"
    for key in KEYS:
        before = rendezvous_order(key, BASES)[0]
        after = rendezvous_order(key, (*BASES, added))[0]
        assert after in (before, added), key


def test_rendezvous_order_of_one_base_is_that_base() -> None:
    assert rendezvous_order(KEYS[0], (BASES[0],)) == [BASES[0]]
