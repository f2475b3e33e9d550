"""The upstream client: how an edge (or shield) fetches what it cannot render.

Upstreams are ordered per key by rendezvous (highest-random-weight) hashing, so every key
has one home upstream and a failed one moves only its own keys to their next choice. A
request fails over to the next upstream on connect errors, timeouts and 5xx, but only
before the first body byte: once bytes have reached players, a broken transfer fails the
fill rather than splicing two sources together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp
from aiohttp import hdrs
from yarl import URL

from edge.cache.fill import FillFailed
from edge.keyring import Keyring
from edge.nodeauth import NODE_HEADER, sign_node_request

log = logging.getLogger("nearvoice.upstream")
CHUNK = 64 * 1024  # bytes per read from an upstream body
EWMA_WEIGHT = 0.2  # weight of the newest first-byte sample


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = 1.0
    """Seconds to establish a connection before trying the next upstream."""
    first_byte_timeout: float = 5.0
    """Seconds to wait for response headers before trying the next upstream."""
    read_timeout: float = 10.0
    """Seconds of silence tolerated between body chunks."""
    first_byte_estimate: float = 0.15
    """Seconds assumed for an upstream's first byte before any has been measured."""


def rendezvous_order(key: str, bases: tuple[str, ...]) -> list[str]:
    def weight(base: str) -> bytes:
        return hashlib.sha256(f"{base}\n{key}".encode()).digest()

    return sorted(bases, key=weight, reverse=True)


@dataclass(slots=True)
class Fetched:
    base: str
    response: aiohttp.ClientResponse

    @property
    def content_type(self) -> str:
        return self.response.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")

    @property
    def content_length(self) -> int | None:
        return self.response.content_length

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.content.iter_chunked(CHUNK):
            yield chunk


class Upstreams:
    def __init__(self, bases: tuple[str, ...], keyring: Keyring, settings: UpstreamSettings):
        self.bases = tuple(b.rstrip("/") for b in bases)
        self.keyring = keyring
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._first_byte = settings.first_byte_estimate

    @property
    def available(self) -> bool:
        return bool(self.bases)

    @property
    def estimated_first_byte(self) -> float:
        """Seconds, an exponentially weighted mean of recent first-byte times."""
        return self._first_byte

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
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

    @contextlib.asynccontextmanager
    async def fetch(self, key: str, target: str) -> AsyncIterator[Fetched]:
        """Opens the object at `target` (a signed path and query) on the first upstream that
        answers 200, in the key's rendezvous order."""
        if self._session is None or not self.bases:
            raise FillFailed("no_upstream", "no upstream is configured", retry_after=5)
        headers = {
            NODE_HEADER: sign_node_request(self.keyring, hdrs.METH_GET, target),
            hdrs.ACCEPT_ENCODING: "identity",
        }
        failures: list[str] = []
        timed_out = False
        for base in rendezvous_order(key, self.bases):
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                async with asyncio.timeout(self.settings.first_byte_timeout):
                    # encoded=True: the target goes out byte for byte as the player sent
                    # it (and as the node signature covers it); yarl must not requote.
                    url = URL(base + target, encoded=True)
                    response = await self._session.get(url, headers=headers)
            except TimeoutError:
                timed_out = True
                failures.append(f"{base}: timeout")
                continue
            except aiohttp.ClientError as exc:
                failures.append(f"{base}: {type(exc).__name__}")
                continue
            if response.status != HTTPStatus.OK:
                failures.append(f"{base}: {response.status}")
                body = await response.read()
                response.release()
                if response.status < HTTPStatus.INTERNAL_SERVER_ERROR:
                    # The upstream refused the request itself; another one would too.
                    raise FillFailed(
                        "upstream_refused", f"upstream answered {response.status}: {body[:200]!r}"
                    )
                continue
            elapsed = loop.time() - started
            self._first_byte += EWMA_WEIGHT * (elapsed - self._first_byte)
            try:
                yield Fetched(base, response)
            finally:
                response.release()
            return
        log.warning("all upstreams failed for %s: %s", key, "; ".join(failures))
        if timed_out:
            raise FillFailed("upstream_timeout", "upstreams did not answer in time", 5)
        raise FillFailed("upstream_unavailable", "no upstream could serve the object", 5)
