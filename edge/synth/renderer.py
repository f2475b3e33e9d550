"""Renders specs off the event loop, streaming encoded bytes as each sentence is ready.

Inference runs in a thread pool sized to the cores; each thread owns its model instances
and uses `ort_threads` onnxruntime threads, so workers x ort_threads stays at the core
count instead of every session spawning one thread per core.

Exact lengths: before its first byte, a render asks the engine's duration pass for the
utterance's sample count and announces the byte length that follows from it (WAV, PCM,
MP3), so the node answers exact ranges from the first byte
(docs/contracts.md#exact-length-from-the-first-byte). The pass runs in its own thread beside
the render of the first chunk, so the first byte waits for the longer of the two rather than
their sum: for a long text the pass covers every sentence, and run first it would stand
between the player and the first phrase; once the first chunk is rendered, the render
thread helps count the pieces the pass has not reached (edge.synth.engine.HelpsCount), so
a long text's length comes after about half its pass on two threads. Where the format's
bytes never depend on the length (`LENGTH_FREE`: raw PCM, MP3, AAC) and the caller can
take the length after the first bytes (`on_length_later`), the first chunk goes out
before the pass: a reader that needs no length (the speech API's raw and SSE streams)
starts at once, while readers that answer ranges still wait for the length. Such a first
chunk renders alone, with the pass started once it has left, so that nothing takes cores
from it (its first window uses two: edge.synth.windows), nor the event loop's GIL while
the loop writes it out (the pass starts by phonemizing, and espeak-ng keeps the GIL), and
the render goes on beside the pass rather than waiting for it: the stream of a long
text does not pause for its count after the first chunk. The length comes when the pass
ends, and a render that passes it stops there. The render then checks that the engine
produced exactly that many samples. If the pass and the render ever disagree, the object
is aborted (never padded or cut to fit), the mismatch is counted in
`nearvoice_length_mismatches_total`, and that voice's lengths are treated as unknown from
then on in this process, until the disagreement is fixed.

Durations: a spec with a `duration` renders at the speed edge.synth.fit chooses from the
duration pass (never a stretched waveform), and its exact length is still announced
first. A target outside 0.5-2.0x of the voice's natural length is refused before any
byte (`duration_out_of_range`). An engine that takes whole specs (`SpecEngine`, the
external servers) fits durations itself; the achieved length is measured and observed in
`nearvoice_duration_error_ratio`.

Admission: each engine has a bounded queue. `estimated_wait` predicts when a new render
would start from the renders ahead of it and a running mean of render times, so the node
can send a miss upstream when that is sooner than rendering here.

Batching engines (edge.synth.batching, the origin's torch engine): their renders run on a
pool of their own, with a thread for every render the queue admits, since those threads
mostly wait for their batch; the batcher runs the model. Their wait is the batcher's
estimate (the window when it is idle, else the batches ahead), each batch's size is
observed in `nearvoice_batch_size{engine}`, and `nearvoice_synth_seconds` stays per
utterance: from the render's start to its last byte, batch wait included.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from nearvoice.edge import activity
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth import fit
from nearvoice.edge.synth.batching import Batcher, Dispatch, batcher_of
from nearvoice.edge.synth.engine import Audio, Engine, HelpsCount, SpecEngine
from nearvoice.edge.synth.priority import CURRENT, PriorityPool, RenderTicket
from nearvoice.edge.synth.resample import Resampler
from nearvoice.edge.synth.streaming import (
    ResamplingEncoder,
    StreamEncoder,
    encoded_length,
    stream_encoder,
)

T = TypeVar("T")
EWMA_WEIGHT = 0.2  # weight of the newest render time in the running mean
INITIAL_RENDER_SECONDS = 0.05  # assumed per render until one has been measured
WRITTEN_WAIT_SECONDS = 0.1
"""How long an early render's pass waits for the event loop to write the first chunk out
before it starts anyway (it takes well under a millisecond on a running loop)."""


class RenderError(Exception):
    """The engine failed; `produced` says whether any byte had already been emitted."""

    def __init__(self, message: str, produced: bool) -> None:
        super().__init__(message)
        self.produced = produced


class RenderRefused(RenderError):
    """The spec cannot be rendered as asked, whoever renders it (a 400, `code`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, produced=False)
        self.code = code


class LengthMismatch(RenderError):
    """The render produced another number of samples than its duration pass announced."""


LengthSink = Callable[[int | None], None]
"""Told the object's exact byte length (None: unknown) once, before the first byte unless
the render said first that the length follows the first bytes."""
LENGTH_FREE = frozenset({AudioFormat.PCM, AudioFormat.MP3, AudioFormat.AAC})
"""Formats whose bytes never depend on the object's length: no header states it (the MP3
encoder's Info frame, which would, is cut: edge.synth.streaming), so their first bytes
can leave before the duration pass ends."""


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
        self._unsized: set[str] = set()
        """Voices whose duration pass disagreed with a render: lengths unknown from now on."""
        self._passes = ThreadPoolExecutor(self.workers, thread_name_prefix="pass")
        """Duration passes, one beside each render's first chunk (`_render_stream`)."""
        self._batchers: dict[int, Batcher[Any, Any]] = {}
        """id(engine) -> its batcher (engines of one kind share a name, not a batcher)."""
        for engine in {id(e): e for e in engines}.values():
            batcher = batcher_of(engine)
            if batcher is not None:
                self._batchers[id(engine)] = batcher
                batcher.listeners.append(self._observer(engine.name))
        self._batched_pool: PriorityPool | None = None
        self._batched_passes: ThreadPoolExecutor | None = None
        if self._batchers:
            # One thread per admitted render: they wait on their batches, the batcher's
            # thread does the work.
            self._batched_pool = PriorityPool(max_queue, thread_name_prefix="batched")
            self._batched_passes = ThreadPoolExecutor(max_queue, thread_name_prefix="bpass")

    def _observer(self, engine: str) -> Callable[[Dispatch], None]:
        histogram = self._metrics.batch_size.labels(engine)

        def observe(dispatch: Dispatch) -> None:
            histogram.observe(dispatch.size)

        return observe

    def _pools(self, engine: Engine) -> tuple[Executor, Executor]:
        """The render pool and the duration-pass pool of `engine`'s renders."""
        if id(engine) in self._batchers:
            assert self._batched_pool is not None and self._batched_passes is not None
            return self._batched_pool, self._batched_passes
        return self._pool, self._passes

    @property
    def voices(self) -> list[str]:
        return sorted(self._by_voice)

    def honours(self, controls: frozenset[str]) -> bool:
        """Whether some engine here honours every one of `controls` (by name)."""
        return any(controls <= engine.controls for engine in self._by_voice.values())

    def engine_for(self, spec: Spec) -> Engine | None:
        """The local engine that renders exactly this spec's model, if any."""
        engine = self._by_voice.get(spec.voice)
        if engine is None or engine.model_id(spec.voice) != spec.model:
            return None
        return engine

    def queue_full(self, engine: Engine) -> bool:
        return self._load[engine.name].pending >= self._max_queue

    def estimated_wait(self, engine: Engine) -> float:
        """Seconds until a render submitted now would start: for a batching engine, until
        its first piece's batch would run."""
        batcher = self._batchers.get(id(engine))
        if batcher is not None:
            return batcher.estimated_wait()
        load = self._load[engine.name]
        return load.pending / self.workers * load.mean_seconds

    async def warmup(self) -> None:
        """Warms every engine in every pool thread: each thread loads its own models and
        sessions now, so a node's memory after warmup is what it runs with (a thread that
        first got work under load would otherwise grow it then)."""
        loop = asyncio.get_running_loop()
        engines = {id(e): e for e in self._by_voice.values()}.values()
        for engine in engines:
            # A batching engine's model is one, run by its batcher: warming it once is enough.
            threads = 1 if id(engine) in self._batchers else self.workers
            await _on_every_thread(loop, self._pools(engine)[0], threads, _warm(engine))
        # The pass threads load their own sessions of the duration graphs; each counts a
        # text of its own, as the pieces of one text are counted once (edge.synth.runs).
        for engine in engines:
            if id(engine) in self._batchers:
                continue
            for voice in engine.voices:
                await _on_every_thread(loop, self._passes, self.workers, _count(engine, voice))

    async def natural_samples(self, engine: Engine, spec: Spec) -> int | None:
        """The duration pass at speed 1: the voice's natural length for `spec`'s text (in
        an inference thread); None when the engine cannot say."""
        loop = asyncio.get_running_loop()
        pool = self._pools(engine)[0]
        return await loop.run_in_executor(pool, engine.samples, spec.text, spec.voice, 1.0)

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
        return spec.format.content_type(spec.rate or engine.sample_rate)

    async def render(
        self,
        engine: Engine,
        spec: Spec,
        sink: Callable[[bytes], None],
        on_length: LengthSink | None = None,
        on_length_later: Callable[[], None] | None = None,
    ) -> float:
        """Renders `spec`, calling `sink` on the event loop with each encoded chunk as soon
        as it exists, and `on_length` with the object's exact length (or None) before the
        first chunk; or, if `on_length_later` is given and the format allows, calling that
        first, then the first chunk, then `on_length`. Returns the seconds of audio
        rendered; raises RenderError."""
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

        def announce(length: int | None) -> None:
            # Queued before the first chunk, so it lands first (call_soon is FIFO).
            if on_length is not None:
                loop.call_soon_threadsafe(on_length, length)

        def later() -> None:
            assert on_length_later is not None
            loop.call_soon_threadsafe(on_length_later)

        def written() -> threading.Event:
            # Set behind the chunks already handed over (call_soon_threadsafe is FIFO),
            # then once more behind the readers those chunks woke: once the readers have
            # written them out. Ordering only, for speed; nothing relies on it.
            event = threading.Event()
            try:
                loop.call_soon_threadsafe(loop.call_soon, event.set)
            except RuntimeError:  # the loop is closed: nobody is writing
                event.set()
            return event

        sized = spec.voice not in self._unsized
        pool, passes = self._pools(engine)
        activity.RENDERS.started()  # queued or running, its duration pass included
        try:
            # The fill's ticket goes with the render into its thread, where a batcher
            # reads it (edge.synth.batching): a prefetch's pieces wait behind a player's.
            audio_seconds = await loop.run_in_executor(
                pool,
                _ticketed,
                CURRENT.get(),
                _render_stream,
                engine,
                spec,
                emit,
                announce,
                sized,
                passes,
                later if on_length_later is not None else None,
                written,
            )
            if spec.duration is not None:
                error = abs(audio_seconds - spec.duration) / spec.duration
                metrics.duration_error.labels(engine.name).observe(error)
        except LengthMismatch:
            self._unsized.add(spec.voice)
            metrics.length_mismatches.labels(engine.name).inc()
            raise
        finally:
            activity.RENDERS.ended()
            load.pending -= 1
            metrics.render_queue.dec()
        elapsed = time.perf_counter() - started
        load.mean_seconds += EWMA_WEIGHT * (elapsed - load.mean_seconds)
        metrics.synth_seconds.observe(elapsed)
        metrics.synth_audio.inc(audio_seconds)
        return audio_seconds

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._passes.shutdown(wait=False, cancel_futures=True)
        if self._batched_pool is not None and self._batched_passes is not None:
            self._batched_pool.shutdown(wait=False, cancel_futures=True)
            self._batched_passes.shutdown(wait=False, cancel_futures=True)


def _ticketed(ticket: RenderTicket | None, call: Callable[..., T], *args: Any) -> T:
    """Runs `call` in this thread with `ticket` as the current render's ticket."""
    token = CURRENT.set(ticket)
    try:
        return call(*args)
    finally:
        CURRENT.reset(token)


async def _on_every_thread(
    loop: asyncio.AbstractEventLoop, pool: Executor, threads: int, work: Callable[[int], object]
) -> None:
    """Runs `work(n)` once on each of `threads` threads of `pool`: a barrier holds each
    task until all have started, so no thread runs two of them."""
    barrier = threading.Barrier(threads)

    def run(n: int) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(WARMUP_BARRIER_SECONDS)
        work(n)

    await asyncio.gather(*(loop.run_in_executor(pool, run, n) for n in range(threads)))


def _warm(engine: Engine) -> Callable[[int], object]:
    return lambda _: engine.warmup()


def _count(engine: Engine, voice: str) -> Callable[[int], object]:
    return lambda n: engine.samples(f"Warm up, thread {n}.", voice, 1.0)


WARMUP_BARRIER_SECONDS = 120.0
"""How long warmup waits for every pool thread to start its task (a pool with fewer
threads than asked breaks the barrier, and the tasks run anyway)."""


def _render_stream(
    engine: Engine,
    spec: Spec,
    emit: Callable[[bytes], None],
    announce: LengthSink,
    sized: bool,
    passes: Executor | None = None,
    later: Callable[[], None] | None = None,
    written: Callable[[], threading.Event] | None = None,
) -> float:
    """In an inference thread: the duration pass (in `passes`, beside the first chunk's
    render), then chunk by chunk, encode and hand over at once. An early render (a
    length-free format whose reader takes the length later) hands over its first chunk,
    starts the pass, which begins once the readers have written that chunk out
    (`written`, set on the event loop), and goes on rendering while it counts."""
    samples = 0
    produced = False
    encoder: StreamEncoder | None = None
    pending: Future[int | None] | None = None
    """An early render's pass, which announces the length itself when it ends."""
    try:
        chunks: Iterator[Audio]
        if isinstance(engine, SpecEngine):  # it applies every control itself
            total = None
            chunks = engine.stream_spec(spec)
        else:
            speed = spec.speed
            if spec.duration is None and sized and passes is not None:
                count = functools.partial(
                    _ticketed, CURRENT.get(), engine.samples, spec.text, spec.voice, speed
                )
                early = later is not None and spec.format in LENGTH_FREE
                # A first chunk that must wait for the length renders beside the pass. One
                # that need not renders alone, on every core its engine can use (edge.synth.
                # windows), and the pass starts once it has left.
                counting = None if early else _submit_pass(passes, count)
                chunks = engine.stream(spec.text, spec.voice, speed, spec.seed)
                first = next(chunks, None)
                if first is not None and early:
                    # No byte depends on the length: the first chunk need not wait for it.
                    assert later is not None
                    encoder = _encoder(engine, spec, None)
                    later()
                    samples = len(first)
                    data = encoder.feed(first)
                    produced = bool(data)
                    emit(data)
                    # The render goes on while the pass counts, so a long text's stream
                    # never waits for its count. The pass announces the length in its own
                    # thread, before its future is done: the length is handed to the loop
                    # before whatever this thread hands over once it has seen the count.
                    total = None
                    out = written() if written is not None else None
                    pending = _submit_pass(
                        passes,
                        _then,
                        functools.partial(_once_set, out, count),
                        lambda n: announce(_length(engine, spec, n)),
                    )
                else:
                    if counting is None:
                        counting = _submit_pass(passes, count)
                    if not counting.done() and isinstance(engine, HelpsCount):
                        engine.help_count(spec.text, spec.voice, speed)
                    total = counting.result()
                    chunks = itertools.chain(() if first is None else (first,), chunks)
            else:
                if spec.duration is None:
                    total = engine.samples(spec.text, spec.voice, speed) if sized else None
                else:
                    fitted = _fit(engine, spec)
                    speed, total = fitted.speed, fitted.samples if sized else None
                chunks = engine.stream(spec.text, spec.voice, speed, spec.seed)
        if encoder is None:
            encoder = _encoder(engine, spec, total)
        if pending is None:
            announce(_length(engine, spec, total))
        for audio in chunks:
            if total is None and pending is not None and pending.done():
                total = pending.result()
            samples += len(audio)
            if total is not None and samples > total:
                break  # checked below, before these samples reach the encoder
            data = encoder.feed(audio)
            produced = produced or bool(data)
            emit(data)
        if pending is not None:
            total = pending.result()
        if total is not None and samples != total:
            raise LengthMismatch(
                f"{engine.name} rendered {samples if samples <= total else 'more than'} "
                f"{'' if samples <= total else f'{total} '}samples of voice {spec.voice!r}; "
                f"its duration pass announced {total}",
                produced,
            )
        emit(encoder.finish())
    except RenderError:
        raise
    except Exception as exc:
        raise RenderError(f"{engine.name} failed: {type(exc).__name__}: {exc}", produced) from exc
    return samples / engine.sample_rate


def _submit_pass(passes: Executor, call: Callable[..., T], *args: Any) -> Future[T]:
    """`call` submitted to the pass pool, counted as work in flight (edge.activity)
    until its future is done, run or cancelled: a first piece must not spin while its own
    render's duration pass counts beside it (a WAV miss, whose header waits for the
    length)."""
    activity.RENDERS.started()
    try:
        future = passes.submit(call, *args)
    except BaseException:
        activity.RENDERS.ended()
        raise
    future.add_done_callback(lambda _: activity.RENDERS.ended())
    return future


def _once_set(event: threading.Event | None, call: Callable[[], T]) -> T:
    """`call()` once `event` is set, or after WRITTEN_WAIT_SECONDS: a loop that stopped
    before setting it (a node shutting down) holds the caller no longer."""
    if event is not None:
        event.wait(WRITTEN_WAIT_SECONDS)
    return call()


def _then(count: Callable[[], int | None], then: Callable[[int | None], None]) -> int | None:
    """`count()`, handed to `then` before it is returned."""
    total = count()
    then(total)
    return total


def _fit(engine: Engine, spec: Spec) -> fit.Fit:
    assert spec.duration is not None
    try:
        return fit.fit(engine, spec.text, spec.voice, spec.duration)
    except fit.DurationOutOfRange as exc:
        raise RenderRefused(exc.code, str(exc)) from exc
    except fit.CannotFit as exc:
        raise RenderError(str(exc), produced=False) from exc


def _encoder(engine: Engine, spec: Spec, total: int | None) -> StreamEncoder:
    """The object's encoder, at the spec's output rate; with `total` (the engine's sample
    count), one whose headers state the length that follows from it."""
    rate = spec.rate or engine.sample_rate
    if rate == engine.sample_rate:
        return stream_encoder(spec.format, rate, total)
    inner = stream_encoder(spec.format, rate, _resampled(engine, rate, total))
    return ResamplingEncoder(inner, engine.sample_rate, rate)


def _length(engine: Engine, spec: Spec, total: int | None) -> int | None:
    """The object's exact byte length when `total` makes it known."""
    rate = spec.rate or engine.sample_rate
    count = total if rate == engine.sample_rate else _resampled(engine, rate, total)
    return None if count is None else encoded_length(spec.format, rate, count)


def _resampled(engine: Engine, rate: int, total: int | None) -> int | None:
    return None if total is None else Resampler(engine.sample_rate, rate).output_count(total)


def _provider_of(engine: Engine) -> str:
    return str(getattr(engine, "provider", "cpu"))
