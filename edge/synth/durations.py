"""The duration pass (docs/contracts.md#exact-length-from-the-first-byte): an utterance's
exact sample count, computed before any audio, so a node can announce an object's byte
length with its first byte.

A TTS graph decides early how long its audio will be. Its duration predictor gives each
token a whole number of frames (a Ceil or a Round), the frames are summed, and that count
is the limit of the Range that lays out the frame positions; everything after it (flows,
spectra, the vocoder) only fills those frames, and fills them at a fixed number of samples
per frame. So the pass runs the part of the graph that feeds that limit and nothing more:
the text encoder and the duration predictor. The part is cut from the engine's own model
file when the engine first needs it (an exported variant's pass is that variant's graph),
and it runs on the engine's providers with the engine's threads, one session per
inference thread as the render's. Its nodes are the render's nodes with the same inputs,
so the count is the count the render will produce, not an estimate; tests check it
against real renders.

Finding the limit: among the graph's Range nodes, those whose limit is computed from a
rounding node (the durations), the one with the fewest nodes behind it: later Ranges
(per-frame positions inside the decoder) are computed from the first one's output.

An engine that cannot find its graph's durations, or whose pass disagrees with a render
(`Durations.check`, run by warmup), reports no length (None), and the node answers as it
does for engines without a pass: correct, only without the length up front.

Where the text encoder is a large part of a render (piper's is about a tenth), an engine
can ask for the graph split in two (`split`): the pass, which also hands off the tensors
the rest of the graph reads, and the rest. A render after the pass then runs only the
rest, so the pass costs nothing extra; every node still runs once on the same inputs, so
the samples are the whole graph's, which the engine checks at warmup before relying on it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from nearvoice.edge import activity
from nearvoice.edge.synth import fusion, windows
from nearvoice.edge.synth.onnxgraph import behind, build_model, reads_of
from nearvoice.edge.synth.providers import session
from nearvoice.edge.synth.windows import Windowed

log = logging.getLogger("nearvoice.durations")

ROUNDING = frozenset({"Ceil", "Round", "Floor"})
"""Ops that turn a predicted duration into whole frames."""


class NoDurationPath(ValueError):
    """A graph in which no Range is laid out from rounded durations."""


@dataclass(frozen=True, slots=True)
class DurationGraph:
    """The part of a TTS graph that computes its frame count."""

    model: bytes
    """A serialized ONNX model: the source's inputs the part reads, one scalar output."""
    inputs: frozenset[str]
    """The source graph's inputs the part reads (the others are not fed to it)."""
    frames: str
    """Name of the frame-count tensor in the source graph."""
    nodes: int
    """Nodes in the part, of `source_nodes` in the whole graph."""
    source_nodes: int
    upsampling: int
    """Product of the strides of every ConvTranspose in the source graph: a VITS vocoder's
    samples per frame (its upsampling layers); 1 when there is none."""
    handoff: tuple[str, ...] = ()
    """Tensors of the part that the rest of the graph reads (with `rest` only)."""
    rest: bytes | None = None
    """The graph without the part's nodes, reading `handoff` and the source's inputs and
    writing the source's outputs: the part and the rest run every node of the graph once,
    so a render that follows its pass does not run the text encoder again. None unless
    asked for, or when a handed-off tensor's type is unknown."""
    rest_inputs: frozenset[str] = frozenset()


def extract(path: Path, split: bool = False, fuse: bool = False) -> DurationGraph:
    """Cuts the frame-count part out of the ONNX model at `path`; with `split`, the rest
    of the graph too, as a second model fed with what the part hands off. With `fuse`,
    both are cut from the model with its layer norms fused (edge.synth.fusion), as the
    engine's whole-graph sessions then load it."""
    import onnx

    model = fusion.load(path) if fuse else onnx.load(str(path))
    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    rounding = {i for i, node in enumerate(graph.node) if node.op_type in ROUNDING}
    best: tuple[str, set[int], set[str]] | None = None
    for node in graph.node:
        if node.op_type != "Range" or len(node.input) < 2:
            continue
        nodes, tensors = behind(graph, producers, node.input[1])
        if nodes & rounding and (best is None or len(nodes) < len(best[1])):
            best = (node.input[1], nodes, tensors)
    if best is None:
        raise NoDurationPath(f"{path}: no Range laid out from rounded durations")
    frames, nodes, tensors = best
    inputs = [i for i in graph.input if i.name in tensors]
    rest = _rest(model, nodes) if split else None
    handoff = rest[1] if rest else ()
    cut = build_model(
        model,
        [graph.node[i] for i in sorted(nodes)],  # the source's order is topological
        inputs,
        [onnx.ValueInfoProto(name=name) for name in (frames, *handoff)],
        tensors,
    )
    upsampling = 1
    for node in graph.node:
        if node.op_type == "ConvTranspose":
            for attribute in node.attribute:
                if attribute.name == "strides":
                    upsampling *= int(np.prod(list(attribute.ints)))
    return DurationGraph(
        model=cut,
        inputs=frozenset(i.name for i in inputs),
        frames=frames,
        nodes=len(nodes),
        source_nodes=len(graph.node),
        upsampling=upsampling,
        handoff=handoff,
        rest=rest[0] if rest else None,
        rest_inputs=rest[2] if rest else frozenset(),
    )


def _rest(source: Any, part: set[int]) -> tuple[bytes, tuple[str, ...], frozenset[str]] | None:
    """The graph without the `part` nodes, its handoff, and the source inputs it reads;
    None when the type of a handed-off tensor cannot be inferred."""
    import onnx
    from onnx import helper

    graph = source.graph
    rest = [i for i in range(len(graph.node)) if i not in part]
    made = {out for i in part for out in graph.node[i].output}
    reads = {name for i in rest for name in reads_of(graph.node[i])}
    if any(o.name in made for o in graph.output):
        return None  # an output of the part would be an input and an output of the rest
    handoff = tuple(sorted(reads & made))
    try:
        inferred = onnx.shape_inference.infer_shapes(source).graph
    except Exception:  # shape inference gives up on some contrib ops: no split then
        return None
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
    if not all(types.get(name) for name in handoff):
        return None
    inputs = [helper.make_tensor_value_info(name, types[name], None) for name in handoff]
    inputs += [i for i in graph.input if i.name in reads]
    model = build_model(source, [graph.node[i] for i in rest], inputs, list(graph.output), reads)
    return model, handoff, frozenset(i.name for i in graph.input if i.name in reads)


Feeds = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Counted:
    """One run of the pass: the samples its render will have, and what the pass hands
    to the rest of the graph (empty when the graph is not split)."""

    samples: int
    handoff: tuple[npt.NDArray[Any], ...] = ()


class Durations:
    """One model's duration pass: the part is cut once, when first needed, and each
    inference thread runs its own session of it, as engines keep their render sessions.

    `samples_per_frame` turns the graph's frame count into samples; it is called once
    with the cut graph, so an engine can take it from the graph (a VITS vocoder's
    upsampling) or from what it knows of its model."""

    def __init__(
        self,
        model: Path,
        threads: int,
        providers: list[Any],
        samples_per_frame: Callable[[DurationGraph], int],
        split: bool = False,
        window_settings: windows.Settings | None = None,
        fuse: bool = False,
    ) -> None:
        self._path = model
        self._split = split
        self.fuse = fuse
        """Whether the parts are cut from the model with its layer norms fused (`extract`):
        the engine's whole-graph sessions must load it so too."""
        self._threads = threads
        self._providers = providers
        self._per_frame = samples_per_frame
        self._lock = threading.Lock()
        self._graph: DurationGraph | None = None
        self._scale = 0
        self.broken: str | None = None
        """Why this pass gives no lengths (None while it works)."""
        self.unsplit: str | None = None if split else "not asked for"
        """Why renders run the whole graph rather than the rest after the pass."""
        self._windows = window_settings
        self._windowed: windows.Windowed | None = None
        self.unwindowed: str | None = None if window_settings else "not asked for"
        """Why first pieces run the rest of the graph whole rather than in windows."""
        self.first_alike: str | None = None if window_settings else "not asked for"
        """Why a render's first piece is counted on the engine's threads rather than on
        the first window's (`count`); None while it is counted on those."""
        self.unspun: str | None = None if window_settings else "not asked for"
        """Why a render's first piece never runs on the sessions that spin (`spinning`);
        None while it may."""
        self._spin = threading.Lock()
        """Held by the one render whose first piece runs on the sessions that spin."""
        self._spinning: Any | None = None
        self._local = threading.local()

    def graph(self) -> DurationGraph | None:
        """The cut part (None when this model has none, with `broken` saying why)."""
        if self._graph is None and self.broken is None:
            with self._lock:
                if self._graph is None and self.broken is None:
                    try:
                        graph = extract(self._path, self._split, self.fuse)
                        self._scale = self._per_frame(graph)
                        self._graph = graph
                    except Exception as exc:  # unreadable graphs too (onnx's own errors)
                        self.disable(f"{type(exc).__name__}: {exc}")
        return self._graph

    def samples(self, feeds: Feeds) -> int | None:
        """Samples the render of `feeds` (one run of the whole graph) will have."""
        counted = self.count(feeds)
        return None if counted is None else counted.samples

    @contextmanager
    def spinning(self) -> Iterator[bool]:
        """Whether a render's first piece (its count, `count(first=True)`, and its first
        window, `rest_windows`) may run on the sessions that spin between operators, for
        as long as the block runs: only when the render is alone on its node
        (edge.activity) and no other render holds them. One such set per model and
        process (about 85 MiB for a piper medium voice), not one per inference thread: it
        serves the render that is alone, and there is one of those at most."""
        if (
            self.unspun is not None
            or not activity.RENDERS.alone()
            or not self._spin.acquire(blocking=False)
        ):
            yield False
        else:
            try:
                yield True
            finally:
                self._spin.release()

    def count(self, feeds: Feeds, first: bool = False, spin: bool = False) -> Counted | None:
        """`samples`, with what the rest of the graph needs to render `feeds`.

        `first`: the count a render's first piece waits for, with nothing else of the
        render running beside it (edge.synth.renderer). It runs on the first window's
        threads (`windows.Settings.first_threads`), as the first window after it does:
        piper's `joe`, first sentences of about 100 ids, 21.3 to 21.7 ms on one thread and
        16.6 to 17.4 ms on two, layer norms fused (p50, runs interleaved, sessions sleeping
        between runs). Either count is
        the other bit for bit (its operators split their work by output, never a sum),
        which warmup checks (`check_first`): the pass and the render may count the same
        piece, and whichever does must give the same handoff. `spin` (with `first`,
        inside `spinning`): on the sessions that spin, the same values again."""
        graph = self.graph()
        if graph is None or self.broken is not None:
            return None
        try:
            if first:
                sess = self._spinning_session(graph) if spin else self._first_session(graph)
            else:
                sess = self._session(graph)
        except Exception as exc:  # a provider that cannot build the part
            self.disable(f"{type(exc).__name__}: {exc}")
            return None
        frames, *handoff = sess.run(None, {k: v for k, v in feeds.items() if k in graph.inputs})
        return Counted(int(np.asarray(frames).reshape(-1)[0]) * self._scale, tuple(handoff))

    def _session(self, graph: DurationGraph) -> Any:
        """This thread's session of the part, on the engine's threads."""
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = self._local.session = session(graph.model, self._threads, self._providers)
        return sess

    def _first_session(self, graph: DurationGraph) -> Any:
        """This thread's session of the part for first pieces (see `count`): on the first
        window's threads, sleeping between runs as the first window's sessions do."""
        if (
            self.first_alike is not None
            or self._windows is None
            or self._windows.first_threads == self._threads
        ):
            return self._session(graph)
        sess = getattr(self._local, "first", None)
        if sess is None:
            threads = self._windows.first_threads
            sess = self._local.first = session(graph.model, threads, self._providers, spin=False)
        return sess

    def _spinning_session(self, graph: DurationGraph) -> Any:
        """The process's one session of the part for first pieces that spins (`spinning`);
        the first pieces' own where those are the engine's."""
        first = self._first_session(graph)
        if self._windows is None or first is self._session(graph):
            return first
        if self._spinning is None:
            with self._lock:
                if self._spinning is None:
                    threads = self._windows.first_threads
                    self._spinning = session(graph.model, threads, self._providers, spin=True)
        return self._spinning

    def check_first(self, feeds: Feeds) -> None:
        """Counts `feeds` on both sessions; first pieces are counted on the engine's own
        threads from now on unless every output agrees bit for bit (see `count`)."""
        graph = self.graph()
        if graph is None or self.broken is not None or self.first_alike is not None:
            return
        given = {k: v for k, v in feeds.items() if k in graph.inputs}
        own = self._session(graph).run(None, given)
        first = self._first_session(graph).run(None, given)
        if not all(np.array_equal(a, b) for a, b in zip(own, first, strict=True)):
            log.warning(
                "%s: first pieces are counted on %d thread(s): %d give other values",
                self._path,
                self._threads,
                self._windows.first_threads if self._windows else self._threads,
            )
            self.first_alike = "the first window's threads count other values"
        self._check_spinning(feeds)

    def _check_spinning(self, feeds: Feeds) -> None:
        """Counts `feeds` and renders its first window on the sessions that spin and on
        those that sleep; first pieces never spin from now on unless both agree bit for
        bit (they share out the same work, only waiting for it differently)."""
        graph = self.graph()
        if graph is None or self.unspun is not None:
            return
        with self._spin:  # warmup runs on every inference thread at once
            own = self.count(feeds, first=True)
            spun = self.count(feeds, first=True, spin=True)
            same = own is not None and spun is not None and _same_counts(own, spun)
            if same and own is not None and spun is not None and self.windowed() is not None:
                try:
                    sleeping = next(self.rest_windows(own, feeds), None)
                    spinning = next(self.rest_windows(spun, feeds, spin=True), None)
                except Exception:  # windows that cannot run: the engine's own check says so
                    sleeping = spinning = None
                same = sleeping is None or (
                    spinning is not None and np.array_equal(sleeping, spinning)
                )
        if not same:
            log.warning("%s: first pieces do not spin: the spinning sessions differ", self._path)
            self.unspun = "the sessions that spin give other values"

    def splits(self) -> bool:
        """Whether renders run the rest of the graph after the pass (see `rest`)."""
        graph = self.graph()
        if graph is not None and graph.rest is None and self.unsplit is None:
            self.unsplit = "the handoff's types are unknown"
        return graph is not None and self.broken is None and self.unsplit is None

    def rest(self, counted: Counted, feeds: Feeds) -> list[npt.NDArray[Any]]:
        """The whole graph's outputs for `feeds`, from the rest of the graph and what the
        pass `counted` for the same feeds. Only while `splits()`."""
        graph = self._graph
        assert graph is not None and graph.rest is not None
        sess = getattr(self._local, "rest", None)
        if sess is None:
            sess = self._local.rest = session(graph.rest, self._threads, self._providers)
        inputs = dict(zip(graph.handoff, counted.handoff, strict=True))
        inputs.update((k, v) for k, v in feeds.items() if k in graph.rest_inputs)
        outputs: list[npt.NDArray[Any]] = sess.run(None, inputs)
        return outputs

    def windowed(self) -> Windowed | None:
        """The rest of the graph with its time-local tail run in windows (edge.synth.
        windows), cut when first asked for; None while renders do not split, when the
        graph has no such tail, or after `no_windows`."""
        if not self.splits() or self.unwindowed is not None:
            return None
        if self._windowed is None:
            with self._lock:
                if self._windowed is None and self.unwindowed is None:
                    graph, settings = self._graph, self._windows
                    assert graph is not None and graph.rest is not None and settings
                    try:
                        tail = windows.cut(graph.rest)
                    except Exception as exc:  # onnx's own errors on odd graphs
                        tail = None
                        self.unwindowed = f"{type(exc).__name__}: {exc}"
                    if tail is None:
                        self.unwindowed = self.unwindowed or "no time-local tail"
                    else:
                        self._windowed = windows.Windowed(
                            tail, self._scale, self._threads, self._providers, settings
                        )
        return self._windowed if self.unwindowed is None else None

    def rest_windows(
        self, counted: Counted, feeds: Feeds, spin: bool = False
    ) -> Iterator[npt.NDArray[np.float32]]:
        """`rest`'s audio window by window (only while `windowed()` is not None): the
        first piece comes after the first window, not the whole utterance. `spin` (inside
        `spinning`): the first window on the sessions that spin."""
        graph, windowed = self._graph, self._windowed
        assert graph is not None and windowed is not None
        inputs = dict(zip(graph.handoff, counted.handoff, strict=True))
        inputs.update((k, v) for k, v in feeds.items() if k in graph.rest_inputs)
        return windowed.run(inputs, counted.samples // self._scale, spin)

    def prepare(self) -> None:
        """Loads this thread's sessions now (the pass's, for first pieces and for the
        others, the rest's, the windowed tail's), not at the thread's first render: each
        is an onnxruntime arena of its own, and a node's memory should be what warmup
        left, not grow when a thread first gets work (nor a first render wait for one)."""
        graph = self.graph()
        if graph is None or self.broken is not None:
            return
        self._session(graph)
        self._first_session(graph)
        if self.unspun is None:
            self._spinning_session(graph)
        if self.splits() and graph.rest is not None and getattr(self._local, "rest", None) is None:
            self._local.rest = session(graph.rest, self._threads, self._providers)
        windowed = self.windowed()
        if windowed is not None:
            windowed.prepare(spinning=self.unspun is None)

    def no_windows(self, reason: str) -> None:
        """Renders run the rest of the graph whole from now on."""
        if self.unwindowed is None:
            log.error("%s: first pieces are not windowed: %s", self._path, reason)
        self.unwindowed = reason

    def no_split(self, reason: str) -> None:
        """Renders run the whole graph from now on."""
        if self.unsplit is None:
            log.error("%s: renders run the whole graph: %s", self._path, reason)
        self.unsplit = reason

    def check(self, counted: int | None, rendered: int) -> None:
        """Disables the pass if `counted` (its count for a text) is not what a render of
        that text gave: a model this module misreads must not announce wrong lengths."""
        if counted is not None and counted != rendered:
            self.disable(f"the duration pass counted {counted} samples, the render gave {rendered}")

    def disable(self, reason: str) -> None:
        if self.broken is None:
            log.error("%s: no exact lengths for this model: %s", self._path, reason)
        self.broken = reason


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The last few values computed in this thread, by key: the front end's work for a
    text (phonemes, token ids) kept between the duration pass and the render that
    follows it on the same inference thread, so the text is processed once."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._local = threading.local()

    def _entries(self) -> OrderedDict[K, V]:
        entries: OrderedDict[K, V] | None = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = OrderedDict()
        return entries

    def get(self, key: K) -> V | None:
        return self._entries().get(key)

    def put(self, key: K, value: V) -> V:
        entries = self._entries()
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self._size:
            entries.popitem(last=False)
        return value


def _same_counts(one: Counted, other: Counted) -> bool:
    return one.samples == other.samples and all(
        np.array_equal(a, b) for a, b in zip(one.handoff, other.handoff, strict=True)
    )
