"""The aiohttp application: routes, typed state and the resources' lifetimes.

Doors turn requests into a grant (a spec under a policy) and frame the answer; between
the two is one core (`edge.core`): lookup (`edge.node`, hot tier then disk) -> fill on a
miss (render with `edge.synth.renderer` or fetch upstream, then store) -> deliver.
Signed URLs: `edge.handlers.speech` (authorize with `edge.token`, Range answers).
The OpenAI-compatible API: `edge.handlers.openai` (API key, raw audio or SSE).
Realtime sessions: `edge.handlers.realtime` (WebSocket, text in and audio out).

With `--workers N`, a miss for a key another worker owns is streamed from that worker
instead (`edge.workers`); each worker answers its siblings on a private unix socket with
the channel app (`edge.handlers.channel`), opened here for the node's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from nearvoice.edge.apikeys import ApiKeys
from nearvoice.edge.config import NodeConfig
from nearvoice.edge.handlers import admin, health, openai, realtime, speech
from nearvoice.edge.handlers.channel import channel_app
from nearvoice.edge.handlers.keys import API_KEYS, NODE
from nearvoice.edge.http.middleware import errors_as_json, seen
from nearvoice.edge.http.proxies import TRUSTED, TrustedProxies
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.logredact import install as redact_access_log
from nearvoice.edge.node import Node
from nearvoice.edge.producer import UpstreamReason
from nearvoice.edge.synth.batching import batcher_of
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.synth.exported import describe
from nearvoice.edge.synth.hibari_engine import HibariEngine, bundled_voices
from nearvoice.edge.synth.piper_engine import BUNDLED as PIPER_VOICES
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.edge.synth.providers import choose as choose_providers
from nearvoice.edge.synth.providers import short_name
from nearvoice.edge.synth.renderer import Renderer
from nearvoice.edge.synth.vits_engine import VitsEngine
from nearvoice.edge.voices import exported_variants

log = logging.getLogger("nearvoice.app")
SPEECH_ROUTE = r"/v1/speech/{key:[0-9a-f]{64}}.{ext:[a-z0-9]{1,8}}"
CHANNEL_SHUTDOWN_TIMEOUT = 10.0  # seconds relays to siblings get to finish at shutdown


def default_engines(config: NodeConfig) -> list[Engine]:
    synth = config.synth
    if not synth.enabled or not synth.voices:
        return []
    exported = exported_variants(config)
    hibari = tuple(v for v in synth.voices if v in bundled_voices())
    piper = tuple(v for v in synth.voices if v in PIPER_VOICES)
    vits = [v for v in synth.voices if v in exported and v not in hibari + piper]
    unknown = [v for v in synth.voices if v not in (*hibari, *piper, *vits)]
    if unknown:
        raise ValueError(
            f"no installed engine or [synth.exports] directory renders voice(s) {unknown} "
            "in [synth] voices"
        )
    providers = choose_providers(synth.providers, Path(config.data_dir) / "trt-cache")
    models = Path(config.data_dir) / "models"
    exported = {v: chosen.pinned(models) for v, chosen in exported.items() if v in synth.voices}
    for chosen in exported.values():
        log.info("%s", describe(chosen))
        if short_name(providers[0]) != chosen.provider:
            log.warning(
                "voice %s: variant chosen for %s, which is not installed; running on %s",
                chosen.voice,
                chosen.provider,
                short_name(providers[0]),
            )
    threads = synth.ort_threads
    engines: list[Engine] = []
    if hibari:
        engines.append(HibariEngine(hibari, threads, providers, exported))
    if piper:
        engines.append(PiperEngine(piper, threads, providers, exported))
    engines.extend(VitsEngine(exported[voice], threads, providers) for voice in vits)
    return engines


def create_app(
    config: NodeConfig,
    keyring: Keyring,
    *,
    engines: list[Engine] | None = None,
    api_keys: ApiKeys | None = None,
) -> web.Application:
    """A node's application. `engines` overrides the configured ones (tests pass []);
    `api_keys` the tenants' keys, NEARVOICE_API_KEYS by default."""
    app = web.Application(
        middlewares=[seen, errors_as_json],
        handler_args={"max_line_size": config.http.max_line_size},
    )
    node = Node(config, keyring, renderer=None)
    chosen = default_engines(config) if engines is None else engines
    if chosen:
        node.renderer = Renderer(
            chosen, config.synth.workers, node.metrics, max_queue=config.synth.max_queue
        )
    app[NODE] = node
    app[API_KEYS] = ApiKeys.from_env() if api_keys is None else api_keys
    app[TRUSTED] = TrustedProxies(config.http.trusted_proxies)
    app[openai.MEMO] = openai.PreparedMemo()
    app[realtime.HUB] = realtime.create_hub(node, app[API_KEYS].tenants)
    redact_access_log()  # ?token= never reaches a log
    openai.check_aliases(node)
    node.metrics.expect(
        engines=[engine.name for engine in chosen],
        batching=[engine.name for engine in chosen if batcher_of(engine) is not None],
        upstream_reasons=[reason.value for reason in UpstreamReason],
    )
    node.upstreams.watch_circuits(node.metrics.circuit)
    app.cleanup_ctx.append(_node_lifetime)

    app.router.add_get(SPEECH_ROUTE, speech.speech)  # GET also answers HEAD
    # Any other GET under /v1/speech/ (traversal attempts included) is a malformed key;
    # other methods fall through to the router's 405 with an Allow header.
    app.router.add_get("/v1/speech/{tail:.*}", speech.malformed)
    app.router.add_post("/v1/audio/speech", openai.speech)
    app.router.add_get("/v1/audio/voices", openai.voices)
    app.router.add_get("/v1/models", openai.models)
    app.router.add_get("/v1/realtime/speech", realtime.speech)
    app.router.add_post("/v1/realtime/tokens", realtime.mint_token)
    app.router.add_get("/demo", realtime.demo)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_post("/admin/purge", admin.purge)
    app.router.add_get("/admin/stats", admin.stats)
    app.router.add_get("/admin/hotkeys", admin.hotkeys)
    app.router.add_post("/admin/prefetch", admin.prefetch)
    app.router.add_get("/admin/prefetch/{job}", admin.prefetch_progress)
    app.router.add_delete("/admin/prefetch/{job}", admin.prefetch_cancel)
    return app


async def _node_lifetime(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    await node.start()
    channel = await _open_channel(app) if node.siblings.enabled else None
    background = [
        asyncio.create_task(_warm(node), name="warmup"),
        asyncio.create_task(_flush_recency_forever(node), name="recency"),
    ]
    yield
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if channel is not None:
        await channel.cleanup()
    await node.stop()
    app[realtime.HUB].close()
    await node.flush_recency()
    node.close()


async def _open_channel(app: web.Application) -> web.AppRunner:
    """Serves the channel app on this worker's socket, in a directory only this user reads."""
    path = app[NODE].siblings.socket
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Whoever can reach the sockets is trusted to answer as a sibling: the directory must
    # be this user's alone (it may be a shared temporary one, see edge.workers.channel_dir).
    found = path.parent.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise RuntimeError(f"{path.parent} must be a directory that only this user can use")
    path.unlink(missing_ok=True)  # left by this worker's previous life, if it crashed
    runner = web.AppRunner(
        channel_app(app, SPEECH_ROUTE),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=CHANNEL_SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


async def _warm(node: Node) -> None:
    if node.renderer is not None:
        await node.renderer.warmup()
        for engine, provider in (await node.renderer.providers()).items():
            log.info("engine %s runs on the %s execution provider", engine, provider)
            node.metrics.engine_provider.labels(engine, provider).set(1)
    node.ready = True
    node.metrics.ready.set(1)
    log.info("node ready")


async def _flush_recency_forever(node: Node) -> None:
    while True:
        await asyncio.sleep(node.config.recency_flush)
        try:
            await node.flush_recency()
        except Exception:
            log.exception("recency flush failed")
