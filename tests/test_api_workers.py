"""A tenant's API limits hold for the node, not per worker: `nearvoice edge --workers 2` as a
real process, driven through the official `openai` SDK.

The kernel spreads connections over the workers (SO_REUSEPORT) and a connection stays with
the worker that accepted it, so each SDK client here has a client of its own holding one
keep-alive connection, and asks `/admin/stats` on it which worker it reached before and
after its speech request. With requests split evenly over both workers, a tenant with a
miss burst of 3 gets exactly 3 renders in all (buckets kept per worker would give up to 3
each), every other request is a 429 in OpenAI's error shape with Retry-After and the
RateLimit fields, and the hit budget is spent for the node the same way.

Realtime sessions likewise: a tenant's `realtime_sessions` counts the sessions of every
worker (edge.seats), and each session keeps a characters budget of its own even where two
workers number their sessions alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai
import pytest

from nearvoice.edge.apikeys import API_KEYS_ENV
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from tests.support import metric_from
from tests.test_workers import (
    ADMIN,
    TIMEOUT,
    WORKERS,
    Connection,
    Node,
    complete,
    workers_node,
)

pytestmark = pytest.mark.slow

T = TypeVar("T")
TENANT_KEY = "limited-secret-0123456789abcdef"
HIT_BURST = 3
MISS_BURST = 3
SESSIONS = 2
PER_WORKER = 5
"""Requests each worker gets in each round: more than a whole burst, so buckets kept per
worker would admit more than the burst in all."""
# Rates so low that no token comes back during a test: the bursts are the budget.
CONFIG = f"""workers = {WORKERS}

[synth]
workers = 1

[api.tenants.limited]
hit_rate = 0.0001
hit_burst = {HIT_BURST}
miss_rate = 0.0001
miss_burst = {MISS_BURST}
realtime_sessions = {SESSIONS}
realtime_chars_per_second = 1

[realtime]
max_message_bytes = 1024
"""


@dataclass
class Outcome:
    worker: int
    status: int
    headers: dict[str, str]
    body: bytes
    error: dict[str, Any] | None


class Client:
    """The official SDK over one keep-alive connection, and the worker that accepted it."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx2.Client(
            limits=httpx2.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=TIMEOUT,
        )
        self.sdk = openai.OpenAI(
            base_url=f"{base}/v1", api_key=TENANT_KEY, max_retries=0, http_client=self.http
        )
        self.worker = self.which_worker()

    def which_worker(self) -> int:
        response = self.http.get(
            f"{self.base}/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert response.status_code == 200, response.text
        return int(response.json()["worker"])

    def speak(self, text: str) -> Outcome:
        """One `audio.speech` call; the worker is asked again afterwards over the same
        connection, so the answer is known to come from it."""
        try:
            with self.sdk.audio.speech.with_streaming_response.create(
                model="tts-1", voice="heart", input=text, response_format="wav"
            ) as response:
                body = b"".join(response.iter_bytes())
                outcome = Outcome(
                    self.worker, response.status_code, dict(response.headers), body, None
                )
        except openai.APIStatusError as exc:
            error = exc.response.json()  # the body as sent, not the SDK's reading of it
            headers = dict(exc.response.headers)
            outcome = Outcome(self.worker, exc.status_code, headers, b"", error)
        assert self.which_worker() == self.worker  # the same connection all along
        return outcome

    def close(self) -> None:
        self.sdk.close()
        self.http.close()


def balanced_clients(node: Node, per_worker: int) -> list[Client]:
    """`per_worker` clients connected to each worker."""
    base = f"http://127.0.0.1:{node.port}"
    kept: dict[int, list[Client]] = {w: [] for w in range(WORKERS)}
    while any(len(c) < per_worker for c in kept.values()):
        client = Client(base)
        if len(kept[client.worker]) < per_worker:
            kept[client.worker].append(client)
        else:
            client.close()
    return [c for clients in kept.values() for c in clients]


@contextlib.contextmanager
def clients_of(node: Node, per_worker: int) -> Iterator[list[Client]]:
    clients = balanced_clients(node, per_worker)
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def at_once(clients: list[Client], call: Callable[[int, Client], T]) -> list[T]:
    """`call(i, client)` for every client, all released together."""
    barrier = threading.Barrier(len(clients))

    def one(i: int) -> T:
        barrier.wait()
        return call(i, clients[i])

    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(one, range(len(clients))))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    env = {API_KEYS_ENV: f"limited:{TENANT_KEY}", ADMIN_TOKEN_ENV: ADMIN}
    with workers_node(tmp_path_factory.mktemp("api-workers"), CONFIG, env=env) as started:
        yield started


def speech_counted(node: Node, before: str, answers: int) -> str:
    """The node's metrics once `answers` more speech answers than in `before` are counted:
    a streamed answer is counted after its last byte went out, which the client may have
    read already."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        after = node.metrics()
        counted = sum(
            metric_from(after, "nearvoice_api_requests_total", endpoint="speech", code=code)
            - metric_from(before, "nearvoice_api_requests_total", endpoint="speech", code=code)
            for code in ("200", "429")
        )
        if counted >= answers:
            return after
        assert time.monotonic() < deadline, f"{counted} of {answers} answers counted"
        time.sleep(0.02)


def delta(before: str, after: str, sample: str, **labels: str) -> float:
    return metric_from(after, sample, **labels) - metric_from(before, sample, **labels)


def assert_refused(outcome: Outcome, scope: str, burst: int) -> None:
    """A 429 in OpenAI's error shape, saying when to come back and which budget it was."""
    assert outcome.status == 429
    assert outcome.error is not None
    assert outcome.error["error"]["type"] == "rate_limit_error"
    assert outcome.error["error"]["code"] == "rate_limited"
    assert int(outcome.headers["retry-after"]) >= 1
    assert outcome.headers["ratelimit-policy"].startswith(f'"api-{scope}";q={burst};w=')
    assert outcome.headers["ratelimit"].startswith(f'"api-{scope}";r=0;t=')


def test_a_tenants_budgets_hold_for_the_node_not_per_worker(node: Node) -> None:
    texts = [f"Limits hold across workers, line {i}." for i in range(WORKERS * PER_WORKER)]
    before = node.metrics()
    with clients_of(node, PER_WORKER) as clients:
        misses = at_once(clients, lambda i, c: c.speak(texts[i]))
    after = speech_counted(node, before, len(misses))

    assert {o.worker for o in misses} == set(range(WORKERS))
    admitted = [i for i, o in enumerate(misses) if o.status == 200]
    assert len(admitted) == MISS_BURST, [(o.worker, o.status) for o in misses]
    for i in admitted:
        assert misses[i].headers["x-nearvoice-cache"] == "miss"
        assert misses[i].body[:4] == b"RIFF"
    for outcome in misses:
        if outcome.status != 200:
            assert_refused(outcome, "miss", MISS_BURST)
    refused = len(misses) - MISS_BURST
    assert delta(before, after, "nearvoice_synth_total", engine="hibari") == MISS_BURST
    assert delta(before, after, "nearvoice_rate_limited_total", scope="api") == refused
    counted = {
        code: delta(before, after, "nearvoice_api_requests_total", endpoint="speech", code=code)
        for code in ("200", "429")
    }
    assert counted == {"200": MISS_BURST, "429": refused}

    # Hits: an object every worker finds complete in the cache spends the hit budget,
    # again for the node. (Until its commit, a worker without the fill would take a
    # repeat for a new miss.)
    rendered = texts[admitted[0]]
    location = urlsplit(misses[admitted[0]].headers["content-location"])
    conn = Connection(node.port)
    try:
        complete(conn, f"{location.path}?{location.query}")
    finally:
        conn.close()
    before = node.metrics()
    with clients_of(node, PER_WORKER) as clients:
        hits = at_once(clients, lambda i, c: c.speak(rendered))
    after = speech_counted(node, before, len(hits))
    assert {o.worker for o in hits} == set(range(WORKERS))
    served = [o for o in hits if o.status == 200]
    assert len(served) == HIT_BURST, [(o.worker, o.status) for o in hits]
    assert all(o.headers["x-nearvoice-cache"] == "hit" for o in served)
    assert all(o.body == misses[admitted[0]].body for o in served)
    for outcome in hits:
        if outcome.status != 200:
            assert_refused(outcome, "hit", HIT_BURST)
    assert delta(before, after, "nearvoice_synth_total", engine="hibari") == 0
    refused = len(hits) - HIT_BURST
    assert delta(before, after, "nearvoice_rate_limited_total", scope="api") == refused


# -- realtime sessions ----------------------------------------------------------------------


def traced(connections: list[str]) -> aiohttp.TraceConfig:
    """Records in `connections` each connection opened ("opened") and reused ("reused")."""
    trace = aiohttp.TraceConfig()

    async def opened(*_: object) -> None:
        connections.append("opened")

    async def reused(*_: object) -> None:
        connections.append("reused")

    trace.on_connection_create_end.append(opened)
    trace.on_connection_reuseconn.append(reused)
    return trace


class Session:
    """A realtime session over a connection that first asked which worker accepted it."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws

    @classmethod
    async def open(cls, node: Node, worker: int) -> Session:
        """A session on `worker`: connections are opened until that worker accepts one."""
        base = f"http://127.0.0.1:{node.port}"
        while True:
            connections: list[str] = []
            http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1), trace_configs=[traced(connections)]
            )
            async with http.get(
                f"{base}/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}
            ) as response:
                stats = await response.json()
            if int(stats["worker"]) != worker:
                await http.close()
                continue
            headers = {"Authorization": f"Bearer {TENANT_KEY}"}
            ws = await http.ws_connect(f"{base}/v1/realtime/speech", headers=headers)
            assert connections == ["opened", "reused"]  # the connection that was asked
            return cls(http, ws)

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send_str(json.dumps({"type": kind, **fields}))

    async def next_event(self) -> dict[str, Any] | int:
        """The next event, or the close code if the server closes the session instead."""
        message = await self.ws.receive(timeout=TIMEOUT)
        if message.type is aiohttp.WSMsgType.TEXT:
            event: dict[str, Any] = json.loads(message.data)
            return event
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
        assert self.ws.close_code is not None
        return self.ws.close_code

    async def update(self) -> dict[str, Any] | int:
        await self.send("session.update", voice="heart", format="pcm")
        return await self.next_event()

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


async def open_sessions(node: Node) -> int:
    return int(metric_from(await asyncio.to_thread(node.metrics), "nearvoice_realtime_sessions"))


async def test_a_tenants_realtime_sessions_are_counted_for_the_node(node: Node) -> None:
    # One session on each worker: together the tenant's limit. Each is its worker's first
    # session; its characters budget is still its own (900 of the 1,024-character burst
    # each would not fit in one budget shared by both).
    held = {w: await Session.open(node, w) for w in range(WORKERS)}
    assert SESSIONS == WORKERS
    try:
        for session in held.values():
            assert (await session.update())["type"] == "session.updated"  # type: ignore[index]
        for session in held.values():
            await session.send("text.delta", text="word " * 180)  # no sentence: nothing renders
            # A bad message answered with an error event, not the session closed with 4001:
            # the text before it was within the session's budget.
            await session.send("no.such.type")
            answer = await session.next_event()
            assert isinstance(answer, dict), f"closed with {answer}"
            assert (answer["type"], answer["error"]) == ("error", "unknown_type")

        # A third session is refused on either worker.
        for worker in range(WORKERS):
            extra = await Session.open(node, worker)
            try:
                assert await extra.update() == 4003
            finally:
                await extra.close()

        # A seat given back on worker 0 can be taken on worker 1.
        await held.pop(0).close()
        deadline = time.monotonic() + TIMEOUT
        while await open_sessions(node) != SESSIONS - 1:  # the worker has let it go
            assert time.monotonic() < deadline, "the closed session is still counted"
            await asyncio.sleep(0.02)
        held[0] = await Session.open(node, 1)
        assert (await held[0].update())["type"] == "session.updated"  # type: ignore[index]
    finally:
        for session in held.values():
            await session.close()
