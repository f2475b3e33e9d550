"""The upstream client under faults: circuit breakers, retries with backoff, timeouts.

The upstreams here are small real aiohttp servers on loopback (`Peer`) that misbehave on
purpose: they answer 503 or 403, drop the connection, hang past the first-byte timeout,
break a body off mid-transfer or send less than its Content-Length. Which peer received
how many requests shows what the client did; nothing of ours is mocked. Plus unit tests of
the breaker's state machine (on a hand-driven clock) and of the backoff's bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from enum import StrEnum
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from nearvoice.edge.cache.fill import FillFailed
from nearvoice.edge.cache.meta import etag_for
from nearvoice.edge.upstream import (
    CHECKSUM_HEADER,
    BreakerState,
    CircuitBreaker,
    Upstreams,
    UpstreamSettings,
    backoff_delay,
    rendezvous_order,
)
from tests.support import Clock, eventually, make_keyring, payload

KEYRING = make_keyring()
BODY = payload(200_000, seed=7)
DIGEST = hashlib.sha256(BODY).hexdigest()
HANG_LIMIT = 30.0  # seconds a hanging peer waits at most (no hung test)
# Breakers that never trip and no retries: each test turns on what it looks at.
CALM: dict[str, Any] = {"failure_threshold": 1000, "retries": 0}


class Mode(StrEnum):
    OK = "ok"
    """200 with the complete body and its X-Nearvoice-Sha256, for GET and HEAD."""
    SLOW_OK = "slow_ok"
    """OK after `delay` seconds."""
    STREAM = "stream"
    """GET: 200, chunked, no digest (an object in flight); half the body, then waits for
    `go` before the rest. HEAD: as OK (the object is complete by the time one asks)."""
    UNAVAILABLE = "503"
    REFUSED = "403"
    GONE = "410"
    """410 with a node's JSON error (a spec whose reference voice was deleted)."""
    NOT_FOUND_PAGE = "404"
    """404 with a plain-text page, not a node's JSON error (a misrouted proxy, say)."""
    CLOSE = "close"
    """Drops the connection without answering."""
    HANG = "hang"
    """Answers nothing until the test ends."""
    BREAK = "break"
    """200, chunked: half the body, then drops the connection."""
    SHORT = "short"
    """200 with Content-Length of the whole body: half of it, then drops the connection."""
    BAD_DIGEST = "bad_digest"
    """OK, but X-Nearvoice-Sha256 names other bytes (GET and HEAD)."""
    NO_DIGEST = "no_digest"
    """OK without X-Nearvoice-Sha256 (GET and HEAD)."""
    WRONG_LENGTH = "wrong_length"
    """HEAD states a Content-Length other than the body's, with the right digest."""


def _etag(request: web.Request) -> str:
    """The ETag a node gives the object a speech path names (what fetching nodes check)."""
    return etag_for(request.path.rsplit("/", 1)[-1].split(".", 1)[0])


class Peer:
    """A real HTTP server on loopback that answers every path according to `mode`, and
    records each request's method in `seen` (and in the shared `log` as `name`)."""

    def __init__(
        self,
        mode: Mode = Mode.OK,
        *,
        name: str = "",
        log: list[str] | None = None,
        body: bytes = BODY,
        fail_first: int = 0,
        delay: float = 0.3,
    ) -> None:
        self.mode = mode
        self.name = name
        self.log = log if log is not None else []
        self.body = body
        self.fail_first = fail_first
        """Answer this many requests 503 before following `mode`."""
        self.delay = delay
        self.seen: list[str] = []
        self.go = asyncio.Event()
        self._ending = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app)

    @property
    def base(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def gets(self) -> int:
        return self.seen.count("GET")

    async def __aenter__(self) -> Peer:
        await self.server.start_server()
        return self

    async def __aexit__(self, *_: object) -> None:
        self._ending.set()
        self.go.set()
        await self.server.close()

    def _complete(self, request: web.Request, digest: str | None) -> web.StreamResponse:
        headers = {"Content-Type": "audio/wav", "ETag": _etag(request)}
        if digest is not None:
            headers[CHECKSUM_HEADER] = digest
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(self.body))
            return web.Response(headers=headers)
        return web.Response(body=self.body, headers=headers)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await self._ending.wait()  # the connection is gone; this answer goes nowhere
        return web.Response()

    async def _half_then(
        self, request: web.Request, length: int | None, rest: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "audio/wav", "ETag": _etag(request)})
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        half = len(self.body) // 2
        await response.write(self.body[:half])
        if not rest:
            return await self._drop(request)
        async with asyncio.timeout(HANG_LIMIT):
            await self.go.wait()
        await response.write(self.body[half:])
        await response.write_eof()
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.method)
        self.log.append(self.name)
        digest = hashlib.sha256(self.body).hexdigest()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="warming up")
        mode = self.mode
        head = request.method == "HEAD"
        if mode is Mode.OK or (mode is Mode.STREAM and head):
            return self._complete(request, digest)
        if mode is Mode.SLOW_OK:
            await asyncio.sleep(self.delay)
            return self._complete(request, digest)
        if mode is Mode.STREAM:
            return await self._half_then(request, None, rest=True)
        if mode is Mode.UNAVAILABLE:
            return web.Response(status=503, text="busy")
        if mode is Mode.REFUSED:
            return web.json_response({"error": "bad_signature"}, status=403)
        if mode is Mode.GONE:
            body = {"error": "unknown_ref", "message": "reference voice ref_x was deleted"}
            return web.json_response(body, status=410)
        if mode is Mode.NOT_FOUND_PAGE:
            return web.Response(status=404, text="404: Not Found")
        if mode is Mode.CLOSE:
            return await self._drop(request)
        if mode is Mode.HANG:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HANG_LIMIT):
                    await self._ending.wait()
            return web.Response(status=503)
        if mode is Mode.BREAK:
            return await self._half_then(request, None, rest=False)
        if mode is Mode.SHORT:
            return await self._half_then(request, len(self.body), rest=False)
        if mode is Mode.BAD_DIGEST:
            return self._complete(request, hashlib.sha256(b"other bytes").hexdigest())
        if mode is Mode.NO_DIGEST:
            return self._complete(request, None)
        assert mode is Mode.WRONG_LENGTH
        if head:
            headers = {CHECKSUM_HEADER: digest, "Content-Length": str(len(self.body) - 1)}
            return web.Response(headers=headers)
        return self._complete(request, digest)


@asynccontextmanager
async def peers(*modes: Mode, **options: Any) -> AsyncIterator[list[Peer]]:
    """Real peers in `modes`, named a, b, c... and sharing one request log."""
    log: list[str] = []
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Peer(mode, name="abcdefgh"[n], log=log, **options))
            for n, mode in enumerate(modes)
        ]


@asynccontextmanager
async def client(*bases: str, **settings: Any) -> AsyncIterator[Upstreams]:
    upstreams = Upstreams(bases, KEYRING, UpstreamSettings(**settings))
    await upstreams.start()
    try:
        yield upstreams
    finally:
        await upstreams.close()


def key_with_order(*order: str) -> str:
    """A key whose rendezvous order over `order`'s bases is exactly `order`."""
    bases = tuple(order)
    n = 0
    while rendezvous_order(f"{n:064x}", bases) != list(order):
        n += 1
    return f"{n:064x}"


def target(key: str) -> str:
    return f"/v1/speech/{key}.wav?s=sealed&exp=1&kid=test1&p=hot&sig=x"


async def fetch(upstreams: Upstreams, key: str) -> tuple[str, bytes]:
    """(the base that answered, the whole body)."""
    async with upstreams.fetch(key, target(key)) as fetched:
        body = b"".join([chunk async for chunk in fetched.chunks()])
        return fetched.base, body


def closed_port_base() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- circuit breaker -----------------------------------------------------------------------


async def test_breaker_opens_after_threshold_failures_and_the_upstream_is_skipped() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=3, retries=0) as up:
            for n in range(1, 4):
                assert up.breaker_state(a.base) == "closed"
                assert await fetch(up, key) == (b.base, BODY)  # failed over to b
                assert (a.gets, b.gets) == (n, n)
            assert up.breaker_state(a.base) == "open"
            assert up.breaker_state(b.base) == "closed"

            for n in range(4, 7):
                assert await fetch(up, key) == (b.base, BODY)
                assert (a.gets, b.gets) == (3, n), "an open upstream still got requests"


async def test_success_resets_the_consecutive_failure_count() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=2, retries=0) as up:
            await fetch(up, key)
            a.mode = Mode.OK
            assert await fetch(up, key) == (a.base, BODY)
            a.mode = Mode.UNAVAILABLE
            await fetch(up, key)
            assert up.breaker_state(a.base) == "closed"  # 1 failure since the success
            await fetch(up, key)
            assert up.breaker_state(a.base) == "open"


@pytest.mark.parametrize("fault", [Mode.CLOSE, Mode.UNAVAILABLE])
async def test_dropped_connections_and_5xx_count_as_failures(fault: Mode) -> None:
    async with peers(fault, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=2, retries=0) as up:
            for _ in range(2):
                assert await fetch(up, key) == (b.base, BODY)
            assert up.breaker_state(a.base) == "open"
            # aiohttp itself resends an idempotent request once over a fresh connection
            # when the server drops it unanswered (RFC 9112 section 9.3.1.1); that is one
            # attempt of ours, one failure.
            per_attempt = 2 if fault is Mode.CLOSE else 1
            assert a.gets == 2 * per_attempt
            assert await fetch(up, key) == (b.base, BODY)
            assert a.gets == 2 * per_attempt


async def test_connect_errors_open_the_breaker() -> None:
    dead = closed_port_base()
    async with peers(Mode.OK) as (b,):
        key = key_with_order(dead, b.base)
        async with client(dead, b.base, failure_threshold=2, retries=0) as up:
            for _ in range(2):
                assert await fetch(up, key) == (b.base, BODY)
            assert up.breaker_state(dead) == "open"


async def test_breaker_half_opens_after_open_seconds_and_a_successful_trial_closes_it() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=1, open_seconds=0.2, retries=0) as up:
            await fetch(up, key)
            assert up.breaker_state(a.base) == "open"
            assert await fetch(up, key) == (b.base, BODY)
            assert a.gets == 1

            await eventually(lambda: up.breaker_state(a.base) == "half_open")
            a.mode = Mode.OK
            assert await fetch(up, key) == (a.base, BODY)  # the trial request
            assert up.breaker_state(a.base) == "closed"
            assert await fetch(up, key) == (a.base, BODY)
            assert a.gets == 3


async def test_failed_trial_reopens_the_breaker() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=2, open_seconds=0.2, retries=0) as up:
            for _ in range(2):
                await fetch(up, key)
            assert up.breaker_state(a.base) == "open"
            await eventually(lambda: up.breaker_state(a.base) == "half_open")

            assert await fetch(up, key) == (b.base, BODY)
            assert a.gets == 3  # exactly one trial, which failed
            assert up.breaker_state(a.base) == "open"
            assert await fetch(up, key) == (b.base, BODY)
            assert a.gets == 3


async def test_half_open_breaker_lets_one_trial_through_at_a_time() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=1, open_seconds=0.2, retries=0) as up:
            await fetch(up, key)
            await eventually(lambda: up.breaker_state(a.base) == "half_open")
            a.mode, a.delay = Mode.SLOW_OK, 0.5
            trial = asyncio.create_task(fetch(up, key))
            await eventually(lambda: a.gets == 2)  # the trial is under way at a
            # Meanwhile every other request skips a.
            assert await fetch(up, key) == (b.base, BODY)
            assert await fetch(up, key) == (b.base, BODY)
            assert a.gets == 2
            assert await trial == (a.base, BODY)
            assert up.breaker_state(a.base) == "closed"


async def test_cancelled_trial_frees_the_trial_slot() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=1, open_seconds=0.2, retries=0) as up:
            await fetch(up, key)
            await eventually(lambda: up.breaker_state(a.base) == "half_open")
            a.mode = Mode.HANG
            trial = asyncio.create_task(fetch(up, key))
            await eventually(lambda: a.gets == 2)
            trial.cancel()
            with pytest.raises(asyncio.CancelledError):
                await trial
            a.mode = Mode.OK
            assert await fetch(up, key) == (a.base, BODY)  # a new trial was allowed
            assert up.breaker_state(a.base) == "closed"


async def test_keys_of_an_open_upstream_go_to_their_next_choice() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.OK, Mode.OK) as (a, b, c):
        via_b = key_with_order(a.base, b.base, c.base)
        via_c = key_with_order(a.base, c.base, b.base)
        async with client(a.base, b.base, c.base, failure_threshold=1, retries=0) as up:
            await fetch(up, via_b)
            assert up.breaker_state(a.base) == "open"
            assert await fetch(up, via_c) == (c.base, BODY)
            assert await fetch(up, via_b) == (b.base, BODY)
            assert a.gets == 1


async def test_when_every_breaker_is_open_a_miss_fails_at_once_until_a_trial() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.UNAVAILABLE) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=1, open_seconds=0.5, retries=0) as up:
            with pytest.raises(FillFailed) as failed:
                await fetch(up, key)
            assert failed.value.code == "upstream_unavailable"
            assert (up.breaker_state(a.base), up.breaker_state(b.base)) == ("open", "open")
            assert a.log == ["a", "b"]

            with pytest.raises(FillFailed) as failed:
                await fetch(up, key)
            assert failed.value.code == "circuit_open"
            assert failed.value.retry_after == 1  # whole seconds until a trial, at least 1
            assert a.log == ["a", "b"], "an upstream behind an open breaker was asked"

            a.mode = Mode.OK
            await eventually(lambda: up.breaker_state(a.base) == "half_open")
            assert await fetch(up, key) == (a.base, BODY)  # the trial
            assert up.breaker_state(a.base) == "closed"  # it proved itself
            assert up.breaker_state(b.base) != "closed"


async def test_a_single_upstream_behind_an_open_breaker_is_not_asked() -> None:
    async with (
        peers(Mode.UNAVAILABLE) as (a,),
        client(a.base, failure_threshold=2, open_seconds=60, retries=0) as up,
    ):
        for _ in range(2):
            with pytest.raises(FillFailed):
                await fetch(up, "k")
        for _ in range(3):
            with pytest.raises(FillFailed) as failed:
                await fetch(up, "k")
            assert failed.value.code == "circuit_open"
            assert 1 <= (failed.value.retry_after or 0) <= 60
        assert a.gets == 2


# -- retries -------------------------------------------------------------------------------


async def test_every_upstream_failing_retries_the_whole_order_then_fails() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.UNAVAILABLE) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(
            a.base, b.base, failure_threshold=1000, retries=2, backoff_base=0.01
        ) as up:
            with pytest.raises(FillFailed) as failed:
                await fetch(up, key)
        assert failed.value.code == "upstream_unavailable"
        assert failed.value.retry_after
        assert a.log == ["a", "b"] * 3


async def test_a_retry_succeeds_when_the_upstream_recovers() -> None:
    async with peers(Mode.OK, fail_first=2) as (a,):
        async with client(a.base, failure_threshold=1000, retries=2, backoff_base=0.01) as up:
            assert await fetch(up, "k") == (a.base, BODY)
        assert a.gets == 3


async def test_retries_stop_once_every_breaker_is_open() -> None:
    async with peers(Mode.UNAVAILABLE, Mode.UNAVAILABLE) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(
            a.base, b.base, failure_threshold=1, open_seconds=60, retries=2, backoff_base=0.01
        ) as up:
            with pytest.raises(FillFailed) as failed:
                await fetch(up, key)
        # Round 1 opens both; there is nobody left to retry.
        assert failed.value.code == "upstream_unavailable"
        assert a.log == ["a", "b"]


async def test_4xx_is_not_retried_nor_failed_over() -> None:
    async with peers(Mode.REFUSED, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=1, retries=2) as up:
            with pytest.raises(FillFailed) as failed:
                await fetch(up, key)
            assert failed.value.code == "upstream_refused"
            assert "403" in str(failed.value)
            assert (a.gets, b.gets) == (1, 0)
            assert up.breaker_state(a.base) == "closed"  # it is up: it answered


async def test_a_definitive_410_is_relayed_and_trips_no_breaker() -> None:
    async with peers(Mode.GONE, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=1, retries=2) as up:
            for _ in range(3):
                with pytest.raises(FillFailed) as failed:
                    await fetch(up, key)
                assert (failed.value.status, failed.value.code) == (410, "unknown_ref")
                assert "deleted" in str(failed.value)
            # Neither retried, failed over, nor counted against the upstream.
            assert (a.gets, b.gets) == (3, 0)
            assert up.breaker_state(a.base) == "closed"
            assert up.breaker(a.base).consecutive_failures == 0


async def test_a_404_without_a_nodes_json_error_is_not_relayed() -> None:
    async with (
        peers(Mode.NOT_FOUND_PAGE) as (a,),
        client(a.base, failure_threshold=1, retries=2) as up,
    ):
        with pytest.raises(FillFailed) as failed:
            await fetch(up, "k")
        assert (failed.value.code, failed.value.status) == ("upstream_refused", None)
        assert up.breaker_state(a.base) == "closed"


@pytest.mark.parametrize("fault", [Mode.BREAK, Mode.SHORT])
async def test_a_body_broken_after_the_first_byte_is_not_retried(fault: Mode) -> None:
    async with peers(fault, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, failure_threshold=1, retries=2) as up:
            received = bytearray()
            with pytest.raises(FillFailed) as failed:
                async with up.fetch(key, target(key)) as fetched:
                    assert fetched.base == a.base
                    async for chunk in fetched.chunks():
                        received += chunk
            assert failed.value.code == "upstream_truncated"
            assert 0 < len(received) < len(BODY)
            assert bytes(received) == BODY[: len(received)]
            assert (a.gets, b.gets) == (1, 0)
            assert up.breaker_state(a.base) == "open"  # a broken body is a failure


def test_backoff_is_full_jitter_under_a_doubling_capped_bound() -> None:
    settings = UpstreamSettings(backoff_base=0.05, backoff_max=0.5)
    rng = random.Random(1)
    for attempt, cap in enumerate([0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]):
        delays = [backoff_delay(attempt, settings, rng) for _ in range(2000)]
        assert all(0.0 <= d <= cap for d in delays)
        assert min(delays) < 0.05 * cap  # full jitter reaches down to nearly nothing
        assert max(delays) > 0.95 * cap


# -- first-byte and connect timeouts ---------------------------------------------------------


async def test_first_byte_timeout_fails_over_to_the_next_upstream() -> None:
    async with peers(Mode.HANG, Mode.OK) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, first_byte_timeout=0.3, **CALM) as up:
            assert await fetch(up, key) == (b.base, BODY)
            assert (a.gets, b.gets) == (1, 1)
            assert up.breaker(a.base).consecutive_failures == 1


async def test_first_byte_timeout_everywhere_is_upstream_timeout_after_retries() -> None:
    async with peers(Mode.HANG) as (a,):
        async with client(
            a.base, first_byte_timeout=0.2, failure_threshold=1000, retries=1, backoff_base=0.01
        ) as up:
            with pytest.raises(FillFailed) as failed:
                await fetch(up, "k")
        assert failed.value.code == "upstream_timeout"
        assert a.gets == 2


async def test_one_deadline_bounds_every_attempt_and_retry_of_a_miss() -> None:
    # Three rounds of a 0.3 s first-byte timeout would hold the miss for 0.9 s; the 0.45 s
    # deadline allows the first attempt whole and what is left of it to the second.
    async with (
        peers(Mode.HANG) as (a,),
        client(
            a.base,
            first_byte_timeout=0.3,
            deadline=0.45,
            failure_threshold=1000,
            retries=2,
            backoff_base=0.0,
            backoff_max=0.0,
        ) as up,
    ):
        with pytest.raises(FillFailed) as failed:
            await fetch(up, "k")
        assert failed.value.code == "upstream_timeout"
        assert a.gets == 2
        # The attempt the deadline cut short is no verdict on the upstream.
        assert up.breaker(a.base).consecutive_failures == 1


async def test_the_deadline_spans_failover_between_upstreams() -> None:
    async with peers(Mode.HANG, Mode.HANG, Mode.OK) as (a, b, c):
        key = key_with_order(a.base, b.base, c.base)
        async with client(
            a.base, b.base, c.base, first_byte_timeout=0.3, deadline=0.5, **CALM
        ) as up:
            with pytest.raises(FillFailed) as failed:
                await fetch(up, key)
            assert failed.value.code == "upstream_timeout"
            assert (a.gets, b.gets, c.gets) == (1, 1, 0)


async def test_slow_first_byte_within_the_timeout_is_served() -> None:
    async with peers(Mode.SLOW_OK, Mode.OK, delay=0.2) as (a, b):
        key = key_with_order(a.base, b.base)
        async with client(a.base, b.base, first_byte_timeout=2.0, **CALM) as up:
            assert await fetch(up, key) == (a.base, BODY)
            assert b.gets == 0


# -- the breaker's state machine (unit, on a hand-driven clock) ----------------------------


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def test_breaker_state_machine() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=5.0, clock=clock)
    assert state(breaker) is BreakerState.CLOSED
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()

    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one at a time
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN  # for another full period
    clock.now += 4.9
    assert state(breaker) is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()  # an abandoned trial frees the slot
    breaker.success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.allow() and breaker.allow()


def test_default_settings() -> None:
    settings = UpstreamSettings()
    assert settings.failure_threshold == 3
    assert settings.open_seconds == 5.0
    assert settings.retries == 2
    assert (settings.backoff_base, settings.backoff_max) == (0.05, 0.5)
    assert settings.first_byte_timeout <= settings.deadline
