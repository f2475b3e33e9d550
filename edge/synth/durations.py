"""The duration pass (DESIGN.md section 10): an utterance's exact sample count, computed
before any audio, so a node can announce an object's byte length with its first byte.

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
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from edge.synth.providers import session

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


def extract(path: Path) -> DurationGraph:
    """Cuts the frame-count part out of the ONNX model at `path`."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    rounding = {i for i, node in enumerate(graph.node) if node.op_type in ROUNDING}
    best: tuple[str, set[int], set[str]] | None = None
    for node in graph.node:
        if node.op_type != "Range" or len(node.input) < 2:
            continue
        nodes, tensors = _behind(graph, producers, node.input[1])
        if nodes & rounding and (best is None or len(nodes) < len(best[1])):
            best = (node.input[1], nodes, tensors)
    if best is None:
        raise NoDurationPath(f"{path}: no Range laid out from rounded durations")
    frames, nodes, tensors = best
    inputs = [i for i in graph.input if i.name in tensors]
    part = helper.make_graph(
        [graph.node[i] for i in sorted(nodes)],  # the source's order is topological
        "durations",
        inputs,
        [onnx.ValueInfoProto(name=frames)],
        initializer=[t for t in graph.initializer if t.name in tensors],
    )
    part.value_info.extend(v for v in graph.value_info if v.name in tensors)
    cut = helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)
    cut.functions.extend(model.functions)
    upsampling = 1
    for node in graph.node:
        if node.op_type == "ConvTranspose":
            for attribute in node.attribute:
                if attribute.name == "strides":
                    upsampling *= int(np.prod(list(attribute.ints)))
    return DurationGraph(
        model=cut.SerializeToString(),
        inputs=frozenset(i.name for i in inputs),
        frames=frames,
        nodes=len(nodes),
        source_nodes=len(graph.node),
        upsampling=upsampling,
    )


def _behind(graph: Any, producers: dict[str, int], tensor: str) -> tuple[set[int], set[str]]:
    """Indices of the nodes that `tensor` is computed from, and every tensor they read."""
    nodes: set[int] = set()
    tensors: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in tensors:
            continue
        tensors.add(name)
        index = producers.get(name)
        if index is not None and index not in nodes:
            nodes.add(index)
            stack.extend(_reads(graph.node[index]))
    return nodes, tensors


def _reads(node: Any) -> list[str]:
    """A node's inputs, with the outer names its subgraphs (If, Loop, Scan bodies) read."""
    names = [i for i in node.input if i]
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            inner = {i.name for i in body.input} | {t.name for t in body.initializer}
            inner |= {out for n in body.node for out in n.output}
            names.extend(i for n in body.node for i in _reads(n) if i not in inner)
    return names


Feeds = Mapping[str, npt.NDArray[Any]]


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
    ) -> None:
        self._path = model
        self._threads = threads
        self._providers = providers
        self._per_frame = samples_per_frame
        self._lock = threading.Lock()
        self._graph: DurationGraph | None = None
        self._scale = 0
        self.broken: str | None = None
        """Why this pass gives no lengths (None while it works)."""
        self._local = threading.local()

    def graph(self) -> DurationGraph | None:
        """The cut part (None when this model has none, with `broken` saying why)."""
        if self._graph is None and self.broken is None:
            with self._lock:
                if self._graph is None and self.broken is None:
                    try:
                        graph = extract(self._path)
                        self._scale = self._per_frame(graph)
                        self._graph = graph
                    except Exception as exc:  # unreadable graphs too (onnx's own errors)
                        self.disable(f"{type(exc).__name__}: {exc}")
        return self._graph

    def samples(self, feeds: Feeds) -> int | None:
        """Samples the render of `feeds` (one run of the whole graph) will have."""
        graph = self.graph()
        if graph is None or self.broken is not None:
            return None
        sess = getattr(self._local, "session", None)
        if sess is None:
            try:
                sess = session(graph.model, self._threads, self._providers)
            except Exception as exc:  # a provider that cannot build the part
                self.disable(f"{type(exc).__name__}: {exc}")
                return None
            self._local.session = sess
        (frames,) = sess.run(None, {k: v for k, v in feeds.items() if k in graph.inputs})
        return int(np.asarray(frames).reshape(-1)[0]) * self._scale

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
