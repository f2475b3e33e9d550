"""The aiohttp application: routes, typed state and the resources' lifetimes.

Doors turn requests into a grant (a spec under a policy) and frame the answer; between
the two is one core (`edge.core`): lookup (`edge.node`, hot tier then disk) -> fill on a
miss (render with `edge.synth.renderer` or fetch upstream, then store) -> deliver.
Signed URLs: `edge.handlers.speech` (authorize with `edge.token`, Range answers).
The OpenAI-compatible API: `edge.handlers.openai` (API key, raw audio or SSE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from edge.apikeys import ApiKeys
from edge.config import NodeConfig
from edge.handlers import admin, health, openai, speech
from edge.handlers.keys import API_KEYS, NODE
from edge.http.middleware import errors_as_json
from edge.http.proxies import TRUSTED, TrustedProxies
from edge.keyring import Keyring
from edge.node import Node
from edge.producer import UpstreamReason
from edge.synth.engine import Engine
from edge.synth.exported import describe
from edge.synth.hibari_engine import HibariEngine, bundled_voices
from edge.synth.piper_engine import BUNDLED as PIPER_VOICES
from edge.synth.piper_engine import PiperEngine
from edge.synth.providers import choose as choose_providers
from edge.synth.providers import short_name
from edge.synth.renderer import Renderer
from edge.synth.vits_engine import VitsEngine
from edge.voices import exported_variants

log = logging.getLogger("nearvoice.app")
SPEECH_ROUTE = r"/v1/speech/{key:[0-9a-f]{64}}.{ext:[a-z0-9]{1,8}}"


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
        middlewares=[errors_as_json], handler_args={"max_line_size": config.http.max_line_size}
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
    openai.check_aliases(node)
    node.metrics.expect(
        engines=[engine.name for engine in chosen],
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
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_post("/admin/purge", admin.purge)
    app.router.add_get("/admin/stats", admin.stats)
    app.router.add_get("/admin/hotkeys", admin.hotkeys)
    app.router.add_post("/admin/prefetch", admin.prefetch)
    app.router.add_get("/admin/prefetch/{job}", admin.prefetch_progress)
    return app


async def _node_lifetime(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    await node.start()
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
    await node.stop()
    await node.flush_recency()
    node.close()


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
