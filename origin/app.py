"""The origin application: the edge core plus the minting API, a persistent object store,
engines on the best execution provider, and prefetch pushes to the edges."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from urllib.parse import urljoin

import aiohttp
from aiohttp import web

from nearvoice.edge.app import create_app, default_engines
from nearvoice.edge.config import ADMIN_TOKEN_ENV, NodeConfig
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.tls import client_context
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.producer import PersistentStore
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.token import Grant
from nearvoice.origin import voices_api
from nearvoice.origin.external import PROTOCOLS, ClipSource, ExternalEngine, ExternalVoice
from nearvoice.origin.mint import REFS, mint
from nearvoice.origin.refvoices import RefVoices
from nearvoice.origin.store import open_store

log = logging.getLogger("nearvoice.origin")
PUSH_TIMEOUT = 5.0  # seconds for one prefetch push to an edge


def create_origin_app(
    config: NodeConfig,
    keyring: Keyring,
    *,
    engines: list[Engine] | None = None,
    persistent: PersistentStore | None = None,
) -> web.Application:
    if persistent is None and config.origin.store:
        persistent = open_store(config.origin.store)
    # Reference voices live in the object store: without one, no clip can be registered.
    registry = RefVoices(persistent) if persistent is not None else None
    if engines is None:
        engines = default_engines(config) + external_engines(config, registry)
        engines += torch_engines(config)
    app = create_app(config, keyring, engines=engines)
    node = app[NODE]
    node.producer.persistent = persistent
    app.router.add_post("/v1/speech", mint)
    if registry is not None:
        app[REFS] = registry
        voices_api.setup(app, registry)
    if config.origin.push_edges:
        up = config.upstream
        pusher = EdgePusher(config.origin.push_edges, client_context(up.ca, up.cert, up.key))
        node.producer.on_stored.append(pusher.schedule)
        app.on_cleanup.append(pusher.close)
    return app


def external_engines(config: NodeConfig, clips: ClipSource | None = None) -> list[Engine]:
    """An engine per `[[external]]` server: how a heavy model on a GPU box joins the origin.
    `clips` gives cloning servers the registered reference voices."""
    engines: list[Engine] = []
    for server in config.external:
        protocol = next((p for p in PROTOCOLS if p == server.protocol), None)
        if protocol is None:
            raise ValueError(f"[[external]] {server.name}: unknown protocol {server.protocol!r}")
        engines.append(
            ExternalEngine(
                base_url=server.base_url,
                protocol=protocol,
                voices=[
                    ExternalVoice(v.name, v.remote, v.model_id, v.remote_model)
                    for v in server.voices
                ],
                sample_rate=server.sample_rate,
                timeout=server.timeout,
                api_key_env=server.api_key_env or None,
                name=server.name,
                controls=frozenset(server.controls),
                clips=clips,
                clip_dir=server.clip_dir or None,
                remote_clip_dir=server.remote_clip_dir or None,
                seconds_per_char=server.seconds_per_char,
            )
        )
    return engines


def torch_engines(config: NodeConfig) -> list[Engine]:
    """An engine per `[[torch]]` checkpoint (edge.synth.torch_engine). torch and
    transformers are imported only here, and only when such a table exists: they are the
    origin's `torch` extra, never the edge's."""
    if not config.torch or not config.synth.enabled:
        return []
    from nearvoice.edge.synth.torch_engine import TorchEngine

    return [TorchEngine(settings) for settings in config.torch]


class EdgePusher:
    """Tells edges to prefetch each `hot` object right after the origin rendered it, so
    the first listener at every edge already gets a hit."""

    def __init__(self, edges: tuple[str, ...], tls: ssl.SSLContext | None = None) -> None:
        self.edges = edges
        self.tls = tls
        """Verifies https:// edges ([upstream] ca, and its client certificate)."""
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, grant: Grant, target: str) -> None:
        if grant.policy.value != "hot":
            return
        task = asyncio.get_running_loop().create_task(self._push(target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, target: str) -> None:
        token = os.environ.get(ADMIN_TOKEN_ENV)
        if not token:
            log.warning("not pushing prefetches: %s is not set", ADMIN_TOKEN_ENV)
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT),
                connector=aiohttp.TCPConnector(ssl=self.tls if self.tls is not None else True),
            )
        headers = {"Authorization": f"Bearer {token}"}
        for edge in self.edges:
            try:
                async with self._session.post(
                    urljoin(edge.rstrip("/") + "/", "admin/prefetch"),
                    json={"urls": [target]},
                    headers=headers,
                ) as response:
                    if response.status >= 300:
                        log.warning("edge %s refused a prefetch push: %s", edge, response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("prefetch push to %s failed: %s", edge, exc)

    async def close(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
