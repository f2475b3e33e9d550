"""Renders specs to complete encoded objects, off the event loop.

Inference runs in a thread pool sized to the cores; each thread owns its model instances
and uses `ort_threads` onnxruntime threads, so workers x ort_threads stays at the core
count instead of every session spawning one thread per core.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edge.errors import ServiceUnavailable
from edge.metrics import Metrics
from edge.spec import Spec
from edge.synth.encode import encode
from edge.synth.engine import Audio, Engine

RETRY_AFTER_SECONDS = "2"


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    content_type: str
    audio_seconds: float


class Renderer:
    def __init__(self, engines: list[Engine], workers: int, metrics: Metrics) -> None:
        self._by_voice: dict[str, Engine] = {v: e for e in engines for v in e.voices}
        self._workers = workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="synth")
        self._metrics = metrics

    @property
    def voices(self) -> list[str]:
        return sorted(self._by_voice)

    def engine_for(self, spec: Spec) -> Engine | None:
        """The local engine that renders exactly this spec's model, if any."""
        engine = self._by_voice.get(spec.voice)
        if engine is None or engine.model_id(spec.voice) != spec.model:
            return None
        return engine

    async def warmup(self) -> None:
        """Warms every engine in every pool thread: each thread loads its own models."""
        loop = asyncio.get_running_loop()
        engines = {id(e): e for e in self._by_voice.values()}.values()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._pool, engine.warmup)
                for engine in engines
                for _ in range(self._workers)
            )
        )

    async def render(self, spec: Spec) -> Rendered:
        engine = self.engine_for(spec)
        if engine is None:
            raise ServiceUnavailable("no_renderer", f"no local engine renders {spec.model}")
        metrics = self._metrics
        metrics.synth.labels(engine.name).inc()
        metrics.render_queue.inc()
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            rendered = await loop.run_in_executor(self._pool, _render, engine, spec)
        except Exception as exc:
            raise ServiceUnavailable(
                "render_failed",
                f"{engine.name} failed to render: {type(exc).__name__}",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            ) from exc
        finally:
            metrics.render_queue.dec()
        metrics.synth_seconds.observe(time.perf_counter() - started)
        metrics.synth_audio.inc(rendered.audio_seconds)
        return rendered

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _render(engine: Engine, spec: Spec) -> Rendered:
    parts: list[Audio] = list(engine.stream(spec.text, spec.voice, spec.speed, spec.seed))
    audio: Audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    body = encode(audio, engine.sample_rate, spec.format)
    return Rendered(
        body=body,
        content_type=spec.format.content_type(engine.sample_rate),
        audio_seconds=len(audio) / engine.sample_rate,
    )
