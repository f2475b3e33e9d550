"""First audio from the first frames: a render's time-local tail, run window by window.

A VITS-family graph spends most of a render after the durations are known, in parts that
are local in time: the flow (stacks of convolutions over frames) and the vocoder (more
convolutions, upsampling each frame to `hop` samples). An output sample there depends on
the frames within a bounded radius of its own, not on the whole utterance. So the tail can
run over the first few frames (with some frames of context on each side) and hand out
their samples before the rest of the utterance has been vocoded: the first byte of a
render waits for the text encoder, the durations and one small window, not for the whole
sentence's audio.

The cut (`cut`): walking back from the graph's output through time-local operators only
(convolutions, elementwise arithmetic and activations, channel splits and concatenations,
shape arithmetic), the tensors where that walk stops are the tail's inputs. Any of those
whose last axis has the frame count is sliced per window; the others (a scale, a speaker
embedding) are fed whole. The walk does not prove locality (a Slice could cut the time
axis, a Conv could be given huge dilations), so engines compare windowed renders with
whole ones at warmup and run the tail whole when they differ (`Windowed.close_to`).

The plan (`plan`) is a function of the frame count alone, so the same text renders to the
same bytes on every node. The first window is short, every later one is `growth` times the
audio already out (so it is vocoded well before the audio ahead of it has played), and the
last takes all that remains. Each window recomputes `context` frames on each side that
another window owns: the price of the early first byte, a few tenths of a window. With
enough context the samples are those of the whole tail up to float rounding at the window
edges (about 1e-7 here, far under a 16-bit step); the render revision (edge.cache.meta)
names these bytes.

The first window runs on `first_threads` onnxruntime threads, whatever the engine's own
(`[synth] ort_threads`, one by default). Nothing else of a render is running while the
first byte waits for it (edge.synth.renderer starts a length-free render's duration pass
after the first chunk), so a second core there is time off the first byte: about 36 to
21 ms for piper's `joe` (48 frames with their context), where the text encoder before it
gains nothing from a second thread (its thousands of small operators cost more in
threads than its convolutions save). The count is a constant of the plan, not of the
node, since onnxruntime's float rounding may depend on how many threads share an
operator: every node vocodes the first window alike, and the render revision names it.
Its session sleeps rather than spins between runs (edge.synth.providers.session), so its
idle thread takes nothing from the renders beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nearvoice.edge.synth.onnxgraph import behind, build_model, reads_of
from nearvoice.edge.synth.providers import session

LOCAL_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Neg", "Exp", "Log", "Sqrt", "Pow", "Abs", "Clip",
        "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Softplus", "Identity", "Cast",
        "Conv", "ConvTranspose",
        "Split", "Concat", "Slice", "Shape", "ConstantOfShape", "Constant", "Gather",
        "Unsqueeze", "Squeeze",
    }
)  # fmt: skip
"""Operators the tail may hold: per frame, per channel, or convolutions along time. Shape
arithmetic (Shape, Gather, ConstantOfShape) follows the window's own shape. Slice, Split
and Concat are taken to act on channels; warmup checks that they do."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How a render's first piece is windowed. Frames are the duration frames (one frame is
    `hop` samples of audio: 256 at 22.05 kHz is 11.6 ms)."""

    first: int = 16
    """Frames in the first window: what the first byte waits for, with its context."""
    context: int = 32
    """Frames of context computed on each side of a window and thrown away."""
    growth: int = 12
    """Each later window holds at most `growth` times the frames already out: vocoding
    it (at about 0.8 ms a frame on one core for piper's medium voices) takes less time
    than playing the audio already out (11.6 ms a frame)."""
    tolerance: float = 1e-4
    """Largest difference from the whole tail's samples that warmup accepts (a 16-bit
    step is 3.1e-5; the windows measured about 1e-7)."""
    first_threads: int = 2
    """onnxruntime threads that vocode the first window, on every node (see above)."""


@dataclass(frozen=True, slots=True)
class Window:
    """Frames [start, stop) of the output, computed from input frames [lo, hi)."""

    start: int
    stop: int
    lo: int
    hi: int


def plan(frames: int, settings: Settings) -> list[Window]:
    """The windows a tail of `frames` frames runs in, in order; one window when the
    utterance is too short for windows to pay."""
    if frames <= 0:
        return []
    if frames <= settings.first + settings.context:
        return [Window(0, frames, 0, frames)]
    windows: list[Window] = []
    start, size = 0, settings.first
    while start < frames:
        stop = frames if frames - start <= size + settings.context else start + size
        lo, hi = max(0, start - settings.context), min(frames, stop + settings.context)
        windows.append(Window(start, stop, lo, hi))
        start = stop
        size = settings.growth * stop
    return windows


@dataclass(frozen=True, slots=True)
class Tail:
    """A graph cut at the start of its time-local tail."""

    head: bytes
    """The graph up to the tail's inputs (its outputs are `inputs`)."""
    tail: bytes
    """The tail: `inputs` in, the source's first output out."""
    inputs: tuple[str, ...]
    """Tensors the head computes and the tail reads."""
    feeds: frozenset[str]
    """The source's own inputs the tail reads too (a noise scale), fed as given."""
    nodes: int
    """Nodes in the tail."""


def cut(model: bytes) -> Tail | None:
    """`model` cut at the start of its time-local tail; None when there is no such tail
    with a vocoder (ConvTranspose) in it, or its inputs' types are unknown."""
    import onnx

    source = onnx.load_from_string(model)
    graph = source.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    initializers = {t.name for t in graph.initializer}
    sources = {i.name for i in graph.input}
    tail: set[int] = set()
    inputs: set[str] = set()
    stack = [graph.output[0].name]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in initializers:
            continue
        seen.add(name)
        index = producers.get(name)
        if index is None or graph.node[index].op_type not in LOCAL_OPS:
            inputs.add(name)
            continue
        tail.add(index)
        stack.extend(reads_of(graph.node[index]))
    if not tail or not any(graph.node[i].op_type == "ConvTranspose" for i in tail):
        return None
    ordered = tuple(sorted(inputs - sources))
    if not ordered:
        return None
    try:
        inferred = onnx.shape_inference.infer_shapes(source).graph
    except Exception:  # some contrib ops defeat shape inference: no windows then
        return None
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
    if not all(types.get(name) for name in ordered):
        return None
    needed: set[int] = set()
    for name in ordered:  # what the cut inputs are computed from (a mask may be in both)
        needed |= behind(graph, producers, name)[0]
    head_nodes = [graph.node[i] for i in sorted(needed)]
    head_reads = {n for node in head_nodes for n in reads_of(node)} | set(ordered)
    head = build_model(
        source,
        head_nodes,
        list(graph.input),
        [onnx.helper.make_tensor_value_info(name, types[name], None) for name in ordered],
        head_reads,
    )
    tail_nodes = [graph.node[i] for i in sorted(tail)]  # the source's order is topological
    tail_model = build_model(
        source,
        tail_nodes,
        [onnx.helper.make_tensor_value_info(name, types[name], None) for name in ordered]
        + [i for i in graph.input if i.name in inputs],
        [graph.output[0]],
        {n for node in tail_nodes for n in reads_of(node)},
    )
    return Tail(
        head=head,
        tail=tail_model,
        inputs=ordered,
        feeds=frozenset(inputs & sources),
        nodes=len(tail),
    )


Feeds = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Sessions:
    """One inference thread's sessions of a cut graph."""

    head: Any
    """The graph up to the tail, on the engine's threads."""
    tail: Any
    """The tail, for every window after the first, on the engine's threads."""
    first: Any
    """The tail again, for the first window, on `Settings.first_threads` threads."""


class Windowed:
    """Runs a graph (the rest after a duration pass) with its tail in windows. Each
    inference thread has its own sessions, as engines keep theirs."""

    def __init__(
        self, cut_tail: Tail, hop: int, threads: int, providers: list[Any], settings: Settings
    ) -> None:
        self._cut = cut_tail
        self._hop = hop
        self._threads = threads
        self._providers = providers
        self.settings = settings
        self._local = threading.local()

    def prepare(self) -> None:
        """Loads this thread's sessions of the head and the tail."""
        self._sessions()

    def _sessions(self) -> Sessions:
        sessions: Sessions | None = getattr(self._local, "sessions", None)
        if sessions is None:
            cut, providers = self._cut, self._providers
            sessions = self._local.sessions = Sessions(
                head=session(cut.head, self._threads, providers),
                tail=session(cut.tail, self._threads, providers),
                first=session(cut.tail, self.settings.first_threads, providers, spin=False),
            )
        return sessions

    def run(self, feeds: Feeds, frames: int) -> Iterator[npt.NDArray[np.float32]]:
        """The graph's first output for `feeds`, `frames` frames long, window by window:
        each piece is yielded as soon as its window has run."""
        sessions = self._sessions()
        cut_inputs = dict(zip(self._cut.inputs, sessions.head.run(None, dict(feeds)), strict=True))
        given = {name: feeds[name] for name in self._cut.feeds}
        for n, window in enumerate(plan(frames, self.settings)):
            tail = sessions.first if n == 0 else sessions.tail
            sliced = {
                name: value[..., window.lo : window.hi]
                if value.ndim and value.shape[-1] == frames
                else value
                for name, value in cut_inputs.items()
            }
            sliced.update(given)
            out = np.asarray(tail.run(None, sliced)[0], dtype=np.float32).reshape(-1)
            begin = (window.start - window.lo) * self._hop
            yield out[begin : begin + (window.stop - window.start) * self._hop]

    def close_to(self, windowed: npt.NDArray[np.float32], whole: npt.NDArray[np.float32]) -> bool:
        """Whether a windowed render is the whole graph's, within `settings.tolerance`."""
        return windowed.shape == whole.shape and bool(
            np.max(np.abs(windowed - whole), initial=0.0) <= self.settings.tolerance
        )
