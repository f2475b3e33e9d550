"""The upstream client: how an edge (or shield) fetches what it cannot render.

Upstreams are ordered per key by rendezvous (highest-random-weight) hashing, so every key
has one home upstream and a failed one moves only its own keys to their next choice. A
request fails over to the next upstream on connect errors, timeouts and 5xx, but only
before the first body byte: once bytes have reached players, a broken transfer fails the
fill rather than splicing two sources together.

Resilience, all before the first byte:

* Each upstream has a `CircuitBreaker`. After `failure_threshold` consecutive failures
  (connect errors, timeouts, 5xx, bodies broken mid-transfer) it opens and the upstream
  is skipped, so its keys go straight to their next choice instead of waiting for a
  timeout each. After `open_seconds` it lets one trial request through (half-open):
  success closes it, failure opens it again. When every upstream is open, a miss fails at
  once with `circuit_open` (503 with Retry-After, or a stale copy): holding players for a
  timeout against upstreams known to be failing helps nobody.
* When every upstream in the order failed, the whole order is tried again, up to
  `retries` more times, after a full-jitter backoff. One `deadline` bounds the whole
  chain (connects, first bytes, backoffs): a miss never waits longer than that for its
  first byte, whatever the number of upstreams and retries. A 4xx is never retried (the upstream
  refused the request itself; another one would too), and nothing is retried once a body
  byte has been handed to the caller.
* A 4xx is an answer, not a failure: the upstream is up, so its breaker counts a success.
  A 404 or 410 with a node's JSON error (`RELAYED`; say, 410 `unknown_ref` for a spec
  whose reference voice was deleted) is definitive about the object itself, and is
  relayed to the player with its status and code; any other 4xx (401 and 403 about this
  node's own credentials, say) is this tier's problem, reported as 502 `upstream_refused`.

End-to-end integrity: a node answering with a complete object sends its digest in
`X-Nearvoice-Sha256` (`CHECKSUM_HEADER`); `Fetched.sha256` exposes it. A
stream of an object still in flight upstream has no digest yet; the fetching node then
confirms the bytes it received with `Upstreams.verify` (a node-signed HEAD) before it
commits them. `Upstreams.confirm` does whichever of the two applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus

import aiohttp
from aiohttp import hdrs
from yarl import URL

from nearvoice.edge.cache.fill import FillFailed
from nearvoice.edge.checks import at_least, between, positive, require
from nearvoice.edge.http.tls import client_context, require_https
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.nodeauth import NODE_HEADER, sign_node_request

log = logging.getLogger("nearvoice.upstream")
CHUNK = 64 * 1024  # bytes per read from an upstream body
EWMA_WEIGHT = 0.2  # weight of the newest first-byte sample
RELAYED = frozenset((HTTPStatus.NOT_FOUND, HTTPStatus.GONE))
"""Upstream statuses relayed as they came: definitive answers about the object, which no
other upstream or later retry would answer otherwise (RFC 9110 sections 15.5.5, 15.5.11)."""
ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""What a relayed JSON error code must look like to be passed on."""
RETRY_AFTER = 5  # seconds a client should wait after every upstream failed
CHECKSUM_HEADER = "X-Nearvoice-Sha256"
"""The lowercase hex SHA-256 of the complete object. A node sends it with every answer
about an object it holds complete (edge.http.deliver.base_headers); never with a stream of
an object still in flight, which has no digest yet."""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = 1.0
    """Seconds to establish a connection before trying the next upstream."""
    first_byte_timeout: float = 5.0
    """Seconds to wait for response headers (connecting included) before trying the next
    upstream."""
    read_timeout: float = 10.0
    """Seconds of silence tolerated between body chunks."""
    first_byte_estimate: float = 0.15
    """Seconds assumed for an upstream's first byte before any has been measured."""
    failure_threshold: int = 3
    """Consecutive failures (connect errors, timeouts, 5xx, broken bodies) that open an
    upstream's circuit breaker."""
    open_seconds: float = 5.0
    """Seconds an open breaker skips its upstream before letting one trial request through
    (half-open)."""
    retries: int = 2
    """Extra rounds through the whole upstream order when every upstream failed before the
    first byte (so at most 1 + retries rounds)."""
    backoff_base: float = 0.05
    """Seconds: the backoff cap before the first retry; it doubles for each later one."""
    backoff_max: float = 0.5
    """Seconds: the largest backoff cap. The sleep is uniform in [0, cap] (full jitter)."""
    deadline: float = 6.0
    """Seconds one miss may spend getting a first byte from upstream, over its whole chain
    of attempts (connects, first bytes, backoffs and retries); a node in front of this one
    should allow more than this."""
    ca: str = ""
    """PEM file of CAs that upstream certificates must chain to; empty: the system's."""
    cert: str = ""
    """PEM file: this node's client certificate for mutual TLS with its upstreams."""
    key: str = ""
    """PEM file: the private key of `cert`."""
    require_tls: bool = False
    """Refuse to start with an upstream that is not https://."""

    def validate(self) -> None:
        for name in ("connect_timeout", "first_byte_timeout", "read_timeout", "open_seconds"):
            positive(self, name)
        positive(self, "deadline")
        at_least(self, "first_byte_estimate", 0)
        at_least(self, "failure_threshold", 1)
        between(self, "retries", 0, 10)
        at_least(self, "backoff_base", 0)
        require(
            self.backoff_max >= self.backoff_base,
            "backoff_max",
            f"{self.backoff_max} is less than backoff_base ({self.backoff_base})",
        )
        require(
            self.connect_timeout <= self.first_byte_timeout <= self.deadline,
            "first_byte_timeout",
            "must hold connect_timeout <= first_byte_timeout <= deadline, not "
            f"{self.connect_timeout} <= {self.first_byte_timeout} <= {self.deadline}",
        )


def relayed_error(status: int, body: bytes) -> FillFailed | None:
    """The FillFailed that relays an upstream's `status` and JSON error `body`, when it is a
    definitive answer about the object (`RELAYED`, with a node's `{"error": CODE,
    "message": ...}`); None for anything else."""
    if status not in RELAYED:
        return None
    try:
        error = json.loads(body)
    except ValueError:
        return None
    code = error.get("error") if isinstance(error, dict) else None
    if not isinstance(code, str) or not ERROR_CODE.fullmatch(code):
        return None
    message = error.get("message")
    said = message[:300] if isinstance(message, str) and message else code.replace("_", " ")
    return FillFailed(code, said, status=status)


def rendezvous_order(key: str, bases: tuple[str, ...]) -> list[str]:
    def weight(base: str) -> bytes:
        return hashlib.sha256(f"{base}\n{key}".encode()).digest()

    return sorted(bases, key=weight, reverse=True)


def backoff_delay(attempt: int, settings: UpstreamSettings, rng: random.Random) -> float:
    """Seconds to sleep before retry number `attempt` (0 for the first retry): full jitter,
    uniform in [0, min(backoff_max, backoff_base * 2**attempt)]."""
    cap = min(settings.backoff_max, settings.backoff_base * 2**attempt)
    return rng.uniform(0.0, cap)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed -> open after `failure_threshold` consecutive failures -> half-open after
    `open_seconds` (one trial request; success closes, failure re-opens).

    Every request that `allow()` let through must report back exactly once: `success()`,
    `failure()`, or `abandon()` when it ended without a verdict (cancelled), so that a
    half-open breaker's single trial slot is never lost.
    """

    def __init__(
        self,
        failure_threshold: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.open_seconds = open_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._trial = False  # a half-open trial request is under way
        self.on_change: Callable[[bool], None] | None = None
        """Called with True when the breaker opens and False when it closes again (a
        half-open breaker is still open here: its upstream has not answered yet)."""

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.open_seconds:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """Whether a request may go to this upstream now; in half-open state this takes
        the one trial slot."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        was_open = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._trial = False
        if was_open and self.on_change is not None:
            self.on_change(False)

    def failure(self) -> None:
        was_open = self._opened_at is not None
        self._failures += 1
        self._trial = False
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            # A failed trial (or a failure of a request forced through an open breaker)
            # opens it for another full period.
            self._opened_at = self._clock()
            if not was_open and self.on_change is not None:
                self.on_change(True)

    def abandon(self) -> None:
        """A request ended with no verdict: free the trial slot, change nothing else."""
        self._trial = False

    def reopens_in(self) -> float:
        """Seconds until an open breaker half-opens (0 when it is not open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.open_seconds - self._clock())


@dataclass(slots=True)
class Fetched:
    base: str
    """The upstream base URL that answered."""
    response: aiohttp.ClientResponse
    breaker: CircuitBreaker | None = None
    """The answering upstream's breaker; a body broken mid-transfer counts against it."""

    @property
    def content_type(self) -> str:
        return self.response.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")

    @property
    def content_length(self) -> int | None:
        return self.response.content_length

    @property
    def sha256(self) -> str | None:
        """The upstream's hex SHA-256 of the complete object, when it had the complete
        object (X-Nearvoice-Sha256); None for a stream of an object still in flight."""
        value = self.response.headers.get(CHECKSUM_HEADER)
        return value.strip().lower() if value else None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body. A transfer that breaks (connection lost, body shorter than its
        Content-Length, read timeout) raises FillFailed; it is never retried."""
        try:
            async for chunk in self.response.content.iter_chunked(CHUNK):
                yield chunk
        except TimeoutError as exc:  # aiohttp's read timeout is a TimeoutError too
            self._broken()
            raise FillFailed(
                "upstream_timeout", f"{self.base} went silent mid-body", RETRY_AFTER
            ) from exc
        except aiohttp.ClientError as exc:
            self._broken()
            raise FillFailed(
                "upstream_truncated",
                f"{self.base} broke off the body: {type(exc).__name__}",
                RETRY_AFTER,
            ) from exc

    def _broken(self) -> None:
        if self.breaker is not None:
            self.breaker.failure()


class Upstreams:
    def __init__(self, bases: tuple[str, ...], keyring: Keyring, settings: UpstreamSettings):
        self.bases = tuple(b.rstrip("/") for b in bases)
        self.keyring = keyring
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self.client_tls: ssl.SSLContext | None = None
        """The TLS context for node-to-node requests ([upstream] ca, cert, key)."""
        self._first_byte = settings.first_byte_estimate
        self._breakers = {
            base: CircuitBreaker(settings.failure_threshold, settings.open_seconds)
            for base in self.bases
        }
        self._random = random.Random()  # noqa: S311 (backoff jitter, not cryptography)

    @property
    def available(self) -> bool:
        return bool(self.bases)

    @property
    def estimated_first_byte(self) -> float:
        """Seconds, an exponentially weighted mean of recent first-byte times."""
        return self._first_byte

    def breaker_state(self, base: str) -> str:
        """The breaker state of the upstream at `base`: "closed", "open" or "half_open"."""
        return self._breakers[base.rstrip("/")].state.value

    def breaker(self, base: str) -> CircuitBreaker:
        """The circuit breaker of the upstream at `base`."""
        return self._breakers[base.rstrip("/")]

    def watch_circuits(self, report: Callable[[str, bool], None]) -> None:
        """Calls `report(base, is_open)` now for every upstream (all closed) and then on
        each change of its breaker (`nearvoice_upstream_circuit_open`)."""
        for base, breaker in self._breakers.items():
            breaker.on_change = functools.partial(report, base)
            report(base, breaker.state is not BreakerState.CLOSED)

    async def start(self) -> None:
        settings = self.settings
        if settings.require_tls:
            require_https(self.bases)
        tls = self.client_tls = client_context(settings.ca, settings.cert, settings.key)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            ),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _url(self, base: str, target: str) -> URL:
        # encoded=True: the target goes out byte for byte as the player sent it (and as
        # the node signature covers it); yarl must not requote.
        return URL(base + target, encoded=True)

    async def _open(
        self,
        session: aiohttp.ClientSession,
        base: str,
        target: str,
        headers: dict[str, str],
        patience: float,
    ) -> aiohttp.ClientResponse | str:
        """One GET to `base` given `patience` seconds for its first byte: its 200 response,
        or why to fail over ("timeout", an error name, a 5xx status), with the outcome
        recorded on the upstream's breaker. A 4xx raises FillFailed: the upstream refused
        the request itself; another one would too."""
        breaker = self._breakers[base]
        try:
            return await self._attempt(session, base, target, headers, breaker, patience)
        except FillFailed:
            raise
        except BaseException:
            breaker.abandon()  # cancelled: no verdict, but never keep the trial slot
            raise

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        base: str,
        target: str,
        headers: dict[str, str],
        breaker: CircuitBreaker,
        patience: float,
    ) -> aiohttp.ClientResponse | str:
        try:
            async with asyncio.timeout(patience):
                response = await session.get(self._url(base, target), headers=headers)
        except TimeoutError:
            if patience < self.settings.first_byte_timeout:
                breaker.abandon()  # cut short by the miss's deadline: no verdict on it
            else:
                breaker.failure()
            return "timeout"
        except aiohttp.ClientError as exc:
            breaker.failure()
            return type(exc).__name__
        if response.status == HTTPStatus.OK:
            breaker.success()
            return response
        try:
            async with asyncio.timeout(patience):
                body = await response.read()  # an error page: short, or cut short
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            response.release()
        if response.status < HTTPStatus.INTERNAL_SERVER_ERROR:
            breaker.success()  # up and answering
            relayed = relayed_error(response.status, body)
            if relayed is not None:
                raise relayed
            raise FillFailed(
                "upstream_refused", f"upstream answered {response.status}: {body[:200]!r}"
            )
        breaker.failure()
        return str(response.status)

    @contextlib.asynccontextmanager
    async def fetch(self, key: str, target: str) -> AsyncIterator[Fetched]:
        """Opens the object at `target` (a signed path and query) on the first upstream that
        answers 200, in the key's rendezvous order, skipping upstreams whose breaker is
        open; retries the whole order with backoff when all of them failed. Everything up
        to the first byte fits in `deadline` seconds; when every breaker is open it fails
        at once (`circuit_open`, with the seconds until one lets a trial through)."""
        session = self._session
        if session is None or not self.bases:
            raise FillFailed("no_upstream", "no upstream is configured", retry_after=5)
        base, response = await self._first_answer(session, key, target)
        try:
            yield Fetched(base, response, self._breakers[base])
        finally:
            response.release()

    async def _first_answer(
        self, session: aiohttp.ClientSession, key: str, target: str
    ) -> tuple[str, aiohttp.ClientResponse]:
        settings = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.deadline
        order = rendezvous_order(key, self.bases)
        failures: list[str] = []
        timed_out = False
        for attempt in range(settings.retries + 1):
            if attempt:
                pause = backoff_delay(attempt - 1, settings, self._random)
                if loop.time() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            tried = False
            for base in order:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    timed_out = True
                    break
                # Asked only when its turn comes, so a half-open breaker's trial slot is
                # taken only by a request that is really sent.
                if not self._breakers[base].allow():
                    failures.append(f"{base}: circuit open")
                    continue
                tried = True
                started = loop.time()
                headers = {
                    # Bound to this upstream and used once (edge.nodeauth).
                    NODE_HEADER: sign_node_request(self.keyring, hdrs.METH_GET, target, base),
                    hdrs.ACCEPT_ENCODING: "identity",
                }
                patience = min(settings.first_byte_timeout, remaining)
                outcome = await self._open(session, base, target, headers, patience)
                if isinstance(outcome, str):
                    timed_out = timed_out or outcome == "timeout"
                    failures.append(f"{base}: {outcome}")
                    continue
                elapsed = loop.time() - started
                self._first_byte += EWMA_WEIGHT * (elapsed - self._first_byte)
                return base, outcome
            if not tried and attempt == 0 and not timed_out:
                # Every upstream is known to be failing: say so now rather than hold the
                # player for a timeout; the caller serves a stale copy if it has one.
                wait = self._reopens_in(order)
                raise FillFailed(
                    "circuit_open",
                    f"every upstream is failing; the next trial in {wait} s",
                    retry_after=wait,
                )
            if not tried or loop.time() >= deadline:
                break
        log.warning("all upstreams failed for %s: %s", key, "; ".join(failures))
        if timed_out:
            raise FillFailed("upstream_timeout", "upstreams did not answer in time", RETRY_AFTER)
        raise FillFailed("upstream_unavailable", "no upstream could serve the object", RETRY_AFTER)

    def _reopens_in(self, order: list[str]) -> int:
        """Whole seconds (at least 1) until the first of `order`'s breakers half-opens."""
        return max(1, math.ceil(min(self._breakers[base].reopens_in() for base in order)))

    async def verify(self, key: str, target: str, base: str, size: int, sha256_hex: str) -> bool:
        """Whether the upstream at `base` confirms that the object at `target` is `size`
        bytes with hex SHA-256 `sha256_hex`: a node-signed HEAD, which an upstream answers
        exactly once the object is complete (waiting for it if it is still in flight).

        False when the upstream does not confirm it, for whatever reason: a different
        Content-Length or digest, no digest header, a non-200 answer, a network error or a
        timeout. Unconfirmed bytes must not be cached."""
        session = self._session
        if session is None:
            return False
        base = base.rstrip("/")
        breaker = self._breakers.get(base)
        headers = {
            NODE_HEADER: sign_node_request(self.keyring, hdrs.METH_HEAD, target, base),
            hdrs.ACCEPT_ENCODING: "identity",
        }
        # The upstream may still be committing; allow it a whole fetch's patience.
        patience = self.settings.first_byte_timeout + self.settings.read_timeout
        try:
            async with (
                asyncio.timeout(patience),
                session.head(
                    self._url(base, target), headers=headers, allow_redirects=False
                ) as response,
            ):
                status = response.status
                length = response.headers.get(hdrs.CONTENT_LENGTH)
                digest = response.headers.get(CHECKSUM_HEADER)
        except (TimeoutError, aiohttp.ClientError) as exc:
            if breaker is not None:
                breaker.failure()
            log.warning("could not verify %s on %s: %s", key, base, type(exc).__name__)
            return False
        if breaker is not None:
            if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
                breaker.failure()
            else:
                breaker.success()
        if status != HTTPStatus.OK:
            log.warning("could not verify %s on %s: HEAD answered %s", key, base, status)
            return False
        if digest is None:
            log.warning("could not verify %s on %s: no %s", key, base, CHECKSUM_HEADER)
            return False
        if length != str(size) or digest.strip().lower() != sha256_hex.lower():
            log.warning(
                "%s from %s does not match: got %d bytes %s, upstream has %s bytes %s",
                key,
                base,
                size,
                sha256_hex,
                length,
                digest,
            )
            return False
        return True

    async def confirm(
        self, key: str, target: str, fetched: Fetched, size: int, sha256_hex: str
    ) -> bool:
        """Whether `size` bytes with digest `sha256_hex`, received through `fetched`, are the
        upstream's complete object: against the digest the answer carried if it had one,
        else by asking the same upstream (`verify`)."""
        if fetched.sha256 is not None:
            if fetched.sha256 == sha256_hex.lower():
                return True
            log.warning(
                "%s from %s does not match its %s: got %s, header says %s",
                key,
                fetched.base,
                CHECKSUM_HEADER,
                sha256_hex,
                fetched.sha256,
            )
            return False
        return await self.verify(key, target, fetched.base, size, sha256_hex)
