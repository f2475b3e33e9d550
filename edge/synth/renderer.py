"""Renders specs off the event loop, streaming encoded bytes as each sentence is ready.

Inference runs in a thread pool sized to the cores; each thread owns its model instances
and uses `ort_threads` onnxruntime threads, so workers x ort_threads stays at the core
count instead of every session spawning one thread per core.

Admission: each engine has a bounded queue. `estimated_wait` predicts when a new render
would start from the renders ahead of it and a running mean of render times, so the node
can send a miss upstream when that is sooner than rendering here.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.metrics import Metrics
from edge.spec import Spec
from edge.synth.engine import Engine
from edge.synth.priority import PriorityPool
from edge.synth.streaming import stream_encoder

EWMA_WEIGHT = 0.2  # weight of the newest render time in the running mean
INITIAL_RENDER_SECONDS = 0.05  # assumed per render until one has been measured


class RenderError(Exception):
    """The engine failed; `produced` says whether any byte had already been emitted."""

    def __init__(self, message: str, produced: bool) -> None:
        super().__init__(message)
        self.produced = produced


@dataclass(slots=True)
class EngineLoad:
    pending: int = 0
    """Renders queued or running."""
    mean_seconds: float = INITIAL_RENDER_SECONDS


class Renderer:
    def __init__(
        self, engines: list[Engine], workers: int, metrics: Metrics, max_queue: int = 64
    ) -> None:
        self._by_voice: dict[str, Engine] = {v: e for e in engines for v in e.voices}
        self.workers = workers or os.cpu_count() or 1
        # Queued renders start by priority: players' misses before prefetches.
        self._pool = PriorityPool(self.workers, thread_name_prefix="synth")
        self._metrics = metrics
        self._max_queue = max_queue
        self._load: dict[str, EngineLoad] = {e.name: EngineLoad() for e in engines}

    @property
    def voices(self) -> list[str]:
        return sorted(self._by_voice)

    def engine_for(self, spec: Spec) -> Engine | None:
        """The local engine that renders exactly this spec's model, if any."""
        engine = self._by_voice.get(spec.voice)
        if engine is None or engine.model_id(spec.voice) != spec.model:
            return None
        return engine

    def queue_full(self, engine: Engine) -> bool:
        return self._load[engine.name].pending >= self._max_queue

    def estimated_wait(self, engine: Engine) -> float:
        """Seconds until a render submitted now would start."""
        load = self._load[engine.name]
        return load.pending / self.workers * load.mean_seconds

    async def warmup(self) -> None:
        """Warms every engine in every pool thread: each thread loads its own models."""
        loop = asyncio.get_running_loop()
        engines = {id(e): e for e in self._by_voice.values()}.values()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._pool, engine.warmup)
                for engine in engines
                for _ in range(self.workers)
            )
        )

    async def providers(self) -> dict[str, str]:
        """Engine name -> the execution provider its sessions run on (read in an inference
        thread: asking loads the model there, never on the event loop)."""
        loop = asyncio.get_running_loop()
        engines = {e.name: e for e in self._by_voice.values()}
        found: dict[str, str] = {}
        for name, engine in engines.items():
            found[name] = await loop.run_in_executor(self._pool, _provider_of, engine)
        return found

    def content_type(self, engine: Engine, spec: Spec) -> str:
        return spec.format.content_type(engine.sample_rate)

    async def render(self, engine: Engine, spec: Spec, sink: Callable[[bytes], None]) -> float:
        """Renders `spec`, calling `sink` on the event loop with each encoded chunk as soon
        as it exists. Returns the seconds of audio rendered; raises RenderError."""
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        load = self._load[engine.name]
        metrics.synth.labels(engine.name).inc()
        metrics.render_queue.inc()
        load.pending += 1
        started = time.perf_counter()

        def emit(data: bytes) -> None:
            if data:
                loop.call_soon_threadsafe(sink, data)

        try:
            audio_seconds = await loop.run_in_executor(
                self._pool, _render_stream, engine, spec, emit
            )
        finally:
            load.pending -= 1
            metrics.render_queue.dec()
        elapsed = time.perf_counter() - started
        load.mean_seconds += EWMA_WEIGHT * (elapsed - load.mean_seconds)
        metrics.synth_seconds.observe(elapsed)
        metrics.synth_audio.inc(audio_seconds)
        return audio_seconds

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _render_stream(engine: Engine, spec: Spec, emit: Callable[[bytes], None]) -> float:
    """In an inference thread: sentence by sentence, encode and hand over at once."""
    encoder = stream_encoder(spec.format, engine.sample_rate)
    samples = 0
    produced = False
    try:
        for audio in engine.stream(spec.text, spec.voice, spec.speed, spec.seed):
            samples += len(audio)
            data = encoder.feed(audio)
            produced = produced or bool(data)
            emit(data)
        emit(encoder.finish())
    except Exception as exc:
        raise RenderError(f"{engine.name} failed: {type(exc).__name__}: {exc}", produced) from exc
    return samples / engine.sample_rate


def _provider_of(engine: Engine) -> str:
    return str(getattr(engine, "provider", "cpu"))
